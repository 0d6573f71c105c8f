"""Score a trained model on the test split, once, in the schema every model shares."""

from __future__ import annotations

from pathlib import Path

from pipeline.heads import load_head
from pipeline.metrics import classification_metrics, confusion_rows
from pipeline.store import read_store


def evaluate_head(store_path: Path, head_path: Path, ece_bins: int = 15) -> tuple[dict, list[dict]]:
    """Test-split metrics of a head on its feature store, and the per-image confusion records."""
    store = read_store(store_path)
    head = load_head(head_path, store)
    x_test, y_test = store.subset("test")
    proba = head.predict_proba(x_test)
    metrics = {
        "model": head.name,
        "strategy": "feature_extraction",
        "kind": head.kind,
        "backbone": store.attrs["backbone"],
        **classification_metrics(y_test, proba, ece_bins),
        "n_train": head.n_train,
        "n_val": head.n_val,
        "n_test": len(y_test),
        "trainable_params": head.trainable_params,
        "fit_seconds": round(head.fit_seconds, 3),
        "hyperparameters": head.hyperparameters,
    }
    return metrics, confusion_rows(y_test, proba.argmax(1), store.classes)
