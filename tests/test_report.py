"""The strategy report's numbers: parameter counts against torch's, a learning-curve point recomputed."""

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.backbones import build_backbone
from pipeline.config import FinetuneParams, HeadParams
from pipeline.curves import learning_curve, subsample_train
from pipeline.dataset import read_manifest
from pipeline.finetune import finetune, freeze
from pipeline.finetune_curve import finetune_curve
from pipeline.finetuned import Classifier
from pipeline.report import ModelRow, finetune_row, head_rows, recommend
from pipeline.selection import train_head
from pipeline.store import FeatureStore
from stages.report import main as report_stage
from tests.conftest import REPO, make_store, prepare_manifest


def blobs(n_per_class: int = 40, dim: int = 6, seed: int = 0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    features = (rng.normal(size=(len(labels), dim)) + np.eye(3, dim)[labels] * 1.5).astype(np.float32)
    split = np.tile([0, 0, 0, 0, 1, 2], len(labels) // 6)
    return make_store(features, labels, split, ["a", "b", "c"], backbone="test_resnet", image_size=32)


def test_a_learning_curve_point_matches_scikit_learn_fitted_by_hand():
    store = blobs()
    head = train_head(store, "logreg", HeadParams(grid={"C": [0.5]}))
    curve = learning_curve(store, head, sizes=[5], seeds=1)
    point = next(p for p in curve if p["label"] == "5")
    sub = subsample_train(store, 5, seed=0)
    x, y = sub.subset("train")
    assert np.bincount(y).tolist() == [5, 5, 5]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000, random_state=0)).fit(x, y)
    x_test, y_test = store.subset("test")
    assert point["accuracy"] == pytest.approx(float((model.predict(x_test) == y_test).mean()))
    assert curve[-1]["label"] == "all"


def test_head_rows_count_the_backbone_with_torch():
    store = blobs(dim=96)  # test_resnet's feature size
    head = train_head(store, "logreg", HeadParams(grid={"C": [1.0]}))
    metrics = {"logreg": {"fit_seconds": 0.1, "accuracy": 0.9, "macro_f1": 0.9, "ece": 0.05}}
    backbone = build_backbone("test_resnet")
    (row,) = head_rows(store, [head], metrics, backbone)
    torch_count = sum(p.numel() for p in backbone.features.parameters())
    assert row.params_updated == 96 * 3 + 3
    assert row.params_total == torch_count + row.params_updated
    assert row.gap == pytest.approx(row.train_accuracy - 0.9)


def test_finetune_row_counts_what_torch_says_was_trainable(image_folder: Path, tmp_path: Path):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    params = replace(
        FinetuneParams(), unfreeze=2, epochs=1, init_head="random", image_size=32, num_workers=0, device="cpu"
    )
    finetune(manifest, image_folder, "test_resnet", params, tmp_path / "ft", tmp_path / "ckpt")
    row = finetune_row(tmp_path / "ft", {"accuracy": 0.5, "macro_f1": 0.5, "ece": 0.1})
    backbone = build_backbone("test_resnet")
    model = Classifier(backbone.features, backbone.feature_dim, 3)
    freeze(model, backbone.blocks(), 2)
    assert row.params_updated == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert row.params_total == sum(p.numel() for p in model.parameters())
    assert row.layers_trained == "last 2 of 5 blocks + new output layer"


def _row(name: str, strategy: str, accuracy: float, seconds: float) -> ModelRow:
    return ModelRow(name, strategy, "", 1, 10, seconds, 1.0, accuracy, accuracy, 0.0, 1.0, 1.0 - accuracy)


def test_recommendation_follows_the_numbers():
    close = [_row("logreg", "feature_extraction", 0.95, 1.0), _row("finetune", "fine_tuning", 0.955, 100.0)]
    assert recommend(close, extract_seconds=9.0) == (
        "Frozen features reach 99% of the fine-tuned accuracy (logreg: 95.0%, fine-tuned: 95.5%) at 1/10 of the "
        "training time (10 s including extraction, against 100 s): use feature extraction."
    )
    far = [_row("logreg", "feature_extraction", 0.90, 1.0), _row("finetune", "fine_tuning", 0.99, 50.0)]
    assert recommend(far, extract_seconds=4.0).startswith("Fine-tuning gains 9.0 points of test accuracy")
    assert recommend(far[:1], 4.0).startswith("Only feature extraction was measured")


def test_finetune_curve_trains_on_subsets_and_scores_the_full_test_split(image_folder: Path, tmp_path: Path):
    manifest = prepare_manifest(image_folder, tmp_path / "manifest.csv")
    params = replace(FinetuneParams(), epochs=1, image_size=32, num_workers=0, device="cpu", init_head="logreg")
    points = finetune_curve(manifest, image_folder, "test_resnet", params, [2, 4], tmp_path / "work")
    assert [p["per_class"] for p in points] == [2, 4]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in points)
    subset = read_manifest(tmp_path / "work" / "manifest-2.csv")
    assert sorted(Counter(r.class_name for r in subset.ok_rows() if r.split == "train").values()) == [2, 2, 2]
    assert sum(r.split == "test" for r in subset.ok_rows()) == 6  # every test image still scored
    config = json.loads((tmp_path / "work" / "model-2" / "config.json").read_text())
    assert config["params"]["init_head"] == "random"  # the logistic head saw every training image


def test_learning_curve_skips_sizes_too_small_for_knn():
    store = blobs()
    head = train_head(store, "knn", HeadParams(kind="knn", grid={"n_neighbors": [5.0]}))
    curve = learning_curve(store, head, sizes=[1, 2, 10], seeds=2)
    assert [p["label"] for p in curve] == ["2", "10", "all"]  # 1 per class: 3 rows, fewer than k = 5


def test_recommendation_when_fine_tuning_is_the_cheaper_run():
    rows = [_row("logreg", "feature_extraction", 0.95, 20.0), _row("finetune", "fine_tuning", 0.95, 5.0)]
    assert "at 4.0x the training time" in recommend(rows, extract_seconds=0.0)


def test_report_refuses_an_unknown_extraction_cost_in_one_line(tmp_path):
    """A cache whose embeddings carry no recorded cost must not be quoted as a few ms of extraction."""
    metrics = tmp_path / "extract.json"
    metrics.write_text(json.dumps({"seconds": 0.1, "computed": 0, "reused": 36, "extraction_seconds": None}))
    args = ["--features", "f.h5", "--heads", "h", "--metrics", "m", "--extract-metrics", str(metrics)]
    args += ["--curve", "c.json", "--finetune-curve", "t.json", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(report_stage, [*args, "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 1 and "has no extraction cost" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
