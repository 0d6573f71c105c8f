"""One metrics schema for every model: feature-extraction heads and fine-tuned networks alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

from pipeline.io import write_json


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


def class_names(indices: np.ndarray, classes: list[str]) -> list[str]:
    """Class indices as names: what the confusion plot shows."""
    return [classes[i] for i in indices]


def model_record(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    *,
    describe: dict,
    sizes: tuple[int, int],
    trainable_params: int,
    fit_seconds: float,
    hyperparameters: dict,
    ece_bins: int,
) -> tuple[dict, list[str], list[str]]:
    """The one schema of every model's test metrics, and each test image's actual and predicted class.

    `describe` names the model (model, strategy, kind, backbone); `sizes` are its train and val images.
    """
    record = {
        **describe,
        **classification_metrics(y_true, proba, ece_bins),
        "n_train": sizes[0],
        "n_val": sizes[1],
        "n_test": len(y_true),
        "trainable_params": trainable_params,
        "fit_seconds": fit_seconds,
        "hyperparameters": hyperparameters,
    }
    return record, class_names(y_true, classes), class_names(proba.argmax(1), classes)


def write_model_metrics(folder: Path, record: dict, actual: list[str], predicted: list[str]) -> None:
    """One model's test metrics and confusion matrix, as the files DVC reads.

    `folder`/metrics.json holds the record: its numbers, which `dvc metrics diff` compares, and the model's
    description (name, strategy, kind, backbone, hyperparameters) beside them. `folder`/plots/sklearn/
    confusion.json holds one {actual, predicted} record per test image, for `dvc plots show`. Written as plain
    JSON, in DVCLive's layout: a DVCLive session would cost a scoring stage half a second to start (it opens
    the DVC repository and reads git) for two files (issue 18).
    """
    write_json(folder / "metrics.json", record, indent=4)
    confusion = [{"actual": a, "predicted": p} for a, p in zip(actual, predicted, strict=True)]
    write_json(folder / "plots" / "sklearn" / "confusion.json", confusion, indent=4)
