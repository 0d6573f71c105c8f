"""benchmarks/scale.py's synthetic store: a valid feature store whose classes a linear probe separates only partly."""

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from benchmarks import scale
from pipeline.features.store import read_store


def test_synthetic_store_is_a_valid_store_with_realistic_overlap(tmp_path):
    written = scale.write_synthetic_store(tmp_path / "synthetic.h5", scale.Spec(rows=2000, classes=20), logme=False)
    store = read_store(tmp_path / "synthetic.h5")
    assert store.features.shape == (2000, 1280) and store.features.dtype == np.float32
    assert store.features.min() >= 0  # post-ReLU, like pooled CNN embeddings
    assert store.split_sizes() == {"train": 1400, "val": 300, "test": 300}  # 70/15/15 within each class
    assert np.bincount(store.labels).tolist() == [100] * 20
    assert store.attrs["label"] == "synthetic" and store.attrs["feature_dim"] == 1280
    assert len(set(store.sha256)) == 2000  # no exact copies for the audit to find
    assert 0.6 <= written.class_cosine <= 0.9
    x_train, y_train = store.subset("train")
    x_test, y_test = store.subset("test")
    scaler = StandardScaler().fit(x_train)
    with threadpool_limits(1):  # a few small products: more BLAS threads only wait for each other on a busy machine
        probe = LogisticRegression(C=0.001, max_iter=200).fit(scaler.transform(x_train), y_train)
    assert 0.5 <= probe.score(scaler.transform(x_test), y_test) <= 0.95


def test_the_extract_metrics_it_writes_are_the_extract_stages_keys(tmp_path):
    """The report and the audit read metrics/extract/<backbone>.json: the benchmark's must have every key the
    stage's ExtractResult.metrics() writes (a field added to ExtractResult fails here, not at 10^5 rows)."""
    written = scale.Written(logme=0.5, class_cosine=0.8, seconds=1.0)
    metrics = scale.extract_metrics(scale.Spec(rows=1000, classes=10), written)
    assert metrics["images"] == 1000 and metrics["feature_dim"] == 1280 and metrics["logme"] == 0.5
    assert metrics["backbone_params"] > 0 and metrics["forward_ms_per_image"] > 0
