"""One metrics schema for every model: feature-extraction heads and fine-tuned networks alike."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from dvclive import Live
from scmrepo.exceptions import SCMError
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

from pipeline.errors import PipelineError


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


# DVCLive announces the experiment it logs to on every stage; the stage's own summary line says what matters.
logging.getLogger("dvclive").setLevel(logging.WARNING)


def log_model(live_dir: Path, record: dict, actual: list[str], predicted: list[str]) -> None:
    """One model's test metrics and confusion matrix, through DVCLive (DVC's own logger).

    `live_dir`/metrics.json holds the record: its numbers logged as metrics, the model's description (name,
    strategy, kind, backbone, hyperparameters) beside them, so `dvc metrics diff` and `dvc exp show` show both.
    `live_dir`/plots/sklearn/confusion.json holds one {actual, predicted} record per test image.
    """
    with _live(live_dir) as live:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                live.log_metric(key, value, plot=False)
            else:
                live.summary[key] = value  # descriptions: DVCLive's summary is the metrics file
        live.log_sklearn_plot("confusion_matrix", actual, predicted, name="confusion.json")


def log_epochs(live_dir: Path, history: list[dict], keys: tuple[str, ...], best_epoch: int) -> None:
    """Per-epoch values through DVCLive: `live_dir`/plots/metrics/<key>.tsv (one row per epoch, for `dvc plots`);
    in `live_dir`/metrics.json (for `dvc exp show`) the values of `best_epoch`, the epoch whose weights were kept,
    not those of the last epoch run."""
    with _live(live_dir) as live:
        for record in history:
            for key in keys:
                live.log_metric(key, record[key])
            live.next_step()
        live.summary = {"best_epoch": best_epoch, "epochs_run": len(history)}
        live.summary.update({key: history[best_epoch - 1][key] for key in keys})


def _live(live_dir: Path) -> Live:
    # The stages' outputs are declared in dvc.yaml; DVCLive neither edits it nor saves experiments itself.
    try:
        return Live(str(live_dir), save_dvc_exp=False, dvcyaml=False)
    except SCMError as err:  # DVCLive reads the current commit, and a new repository has none (dvclive#522)
        raise PipelineError(
            f"DVCLive cannot log to {live_dir}: {err}; commit once (git add -A && git commit -m start), "
            "then run `dvc repro` again (the stages that finished are kept)"
        ) from err
