"""One metrics schema for every model: feature-extraction heads and fine-tuned networks alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017).

    Written by hand: scikit-learn has reliability curves but no multiclass ECE.
    """
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin k holds confidences in (edges[k], edges[k+1]]; a confidence of exactly 0 joins the first bin.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for k in range(n_bins):
        members = bins == k
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, log loss and ECE of class probabilities `proba` [N, C]."""
    y_true = np.asarray(y_true)
    y_pred = proba.argmax(axis=1)
    labels = np.arange(proba.shape[1])
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        "log_loss": float(log_loss(y_true, proba, labels=labels)),
        "ece": expected_calibration_error(y_true, proba, n_bins),
    }


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> list[dict[str, str]]:
    """One {actual, predicted} record per test image: the input of DVC's confusion-matrix plot."""
    return [{"actual": classes[t], "predicted": classes[p]} for t, p in zip(y_true, y_pred, strict=True)]


def write_json(path: Path, payload: object) -> None:
    """Write JSON atomically, so a failed stage never leaves a half-written metrics file."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
