"""Score a head on its feature store's test split, once, in the schema every model shares (no torch here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.config import EvaluateParams
from pipeline.core.timing import median_ms_per_row
from pipeline.features.hdf5 import StoreError
from pipeline.features.store import FeatureStore, read_store
from pipeline.heads.persistence import load_head
from pipeline.heads.trained import TrainedHead
from pipeline.results.metrics import TRAIN_ACCURACY_ROWS, Scored, model_record


def evaluate_head(store_path: Path, head_path: Path, params: EvaluateParams | None = None) -> Scored:
    """Test-split metrics of a head on its feature store, and each test image's answer (`params`: the
    evaluate section, its defaults when None)."""
    store = read_store(store_path)
    return score_head(store, store_path, load_head(head_path, store), params)


def train_accuracy(head: TrainedHead, store: FeatureStore, at_most: int = TRAIN_ACCURACY_ROWS, seed: int = 0) -> float:
    """The head's accuracy on the store's training rows (a seeded sample of `at_most` when there are more), read
    where they lie in the store: a copy of the sample alone."""
    rows = store.rows("train")
    if len(rows) > at_most:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), at_most, replace=False))]
    return float((head.predict_proba(store.features[rows]).argmax(1) == store.labels[rows]).mean())


def check_has_test_rows(sizes: FeatureStore | dict[str, int], store_path: Path) -> None:
    """Refuse a store without test rows (`sizes`: the store, or its split sizes)."""
    if not (sizes if isinstance(sizes, dict) else sizes.split_sizes())["test"]:
        raise StoreError(f"{store_path} has no test images to score; set prepare.test_fraction above 0")


def score_head(
    store: FeatureStore,
    store_path: Path,
    head: TrainedHead,
    params: EvaluateParams | None = None,
    train_accuracy: float | None = None,
) -> Scored:
    """`evaluate_head` for a head in memory, trained on `store` (the head stage scores what it just trained, and
    records its `train_accuracy`)."""
    check_has_test_rows(store, store_path)
    x_test, y_test = store.subset("test")
    return model_record(
        y_test,
        head.predict_proba(x_test),
        store.classes,
        store.paths_of("test"),
        describe={
            "model": head.model_name,
            "strategy": "feature_extraction",
            "kind": head.kind,
            "backbone": store.attrs["backbone"],
        },
        sizes=(head.n_train, head.n_val),
        trainable_params=head.trainable_params,
        fit_seconds=round(head.fit_seconds, 3),
        costs={"head_ms_per_image": round(head_ms_per_image(head, store.features), 6)},
        **({} if train_accuracy is None else {"train_accuracy": train_accuracy}),
        hyperparameters=head.hyperparameters,
        params=params or EvaluateParams(),
    )


def head_ms_per_image(head: TrainedHead, features: np.ndarray) -> float:
    """The head's own cost per image on cached features (the first 1,000 rows at most): what it adds to its
    backbone's forward pass."""
    rows = features[:1000]
    return median_ms_per_row(lambda: head.predict_proba(rows), len(rows))
