"""One metrics schema for every model: feature-extraction heads and fine-tuned networks alike."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

from pipeline.core.config import EvaluateParams
from pipeline.core.errors import PipelineError
from pipeline.core.io import write_csv, write_json, write_record
from pipeline.results.stats import bootstrap_interval, macro_f1, wilson_interval


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017).

    Written by hand: scikit-learn has reliability curves but no multiclass ECE.
    """
    return top_label_ece(proba.max(axis=1), proba.argmax(axis=1) == y_true, n_bins)


def top_label_ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE from each image's top-class probability and whether that class was right: each bin's gap between
    accuracy and mean confidence, weighted by its share of the images."""
    counts, accuracy, mean_confidence = calibration_bins(confidence, correct, n_bins)
    ece = 0.0
    for k in np.flatnonzero(counts):
        ece += counts[k] / len(confidence) * abs(accuracy[k] - mean_confidence[k])
    return float(ece)


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: (images, accuracy, mean confidence); accuracy and confidence are NaN where
    the bin is empty. The bins of the ECE and of the reliability diagram.

    Bin k holds confidences in (edges[k], edges[k+1]]; a confidence of exactly 0 joins the first bin.
    """
    confidence, correct = np.ravel(confidence), np.ravel(correct)
    if confidence.shape != correct.shape:
        raise ValueError(f"{confidence.size} confidences but {correct.size} correctness flags")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    accuracy, mean_confidence = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    for k in np.flatnonzero(counts):
        members = bins == k
        accuracy[k], mean_confidence[k] = correct[members].mean(), confidence[members].mean()
    return counts, accuracy, mean_confidence


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


@dataclass(frozen=True)
class Scored:
    """A model's test metrics, and what it answered for each test image (in the test split's order)."""

    record: dict
    paths: list[str]
    actual: list[str]
    predicted: list[str]
    confidence: list[float]  # the probability of the predicted class


def intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, params: EvaluateParams) -> dict[str, float]:
    """95% intervals (<score>_low, <score>_high): Wilson's for accuracy (a proportion), a percentile bootstrap over
    the test images for macro-F1 (no closed form), seeded by `params` so that a rerun writes the same numbers."""
    accuracy = wilson_interval(int((y_true == y_pred).sum()), len(y_true))
    f1 = bootstrap_interval(
        y_true,
        y_pred,
        lambda t, p: macro_f1(t, p, n_classes),
        n_resamples=params.bootstrap_resamples,
        seed=params.seed,
    )
    return {
        "accuracy_low": accuracy[0],
        "accuracy_high": accuracy[1],
        "macro_f1_low": f1[0],
        "macro_f1_high": f1[1],
    }


# The training rows a model's train accuracy (the report's overfitting gap) is computed on, at most: a seeded sample
# beyond that, so that it costs what scoring the test split costs, not a pass over a million rows (k-NN's quadratic).
# Train accuracy is a gauge of overfitting (its gap to test accuracy), not a result: 5,000 rows measure it within
# about 1.4 points (95%), and spare k-NN a search of every training row at 10^5 rows and more.
TRAIN_ACCURACY_ROWS = 5_000

# What a model's metrics.json holds: how good it is on the test split, and how sure (95% intervals). Everything else
# the record says goes to details.json beside it.
SCORE_KEYS = (
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "balanced_accuracy",
    "macro_f1",
    "macro_f1_low",
    "macro_f1_high",
    "log_loss",
    "ece",
)


def model_record(
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    paths: list[str],
    *,
    describe: dict,
    sizes: tuple[int, int],
    trainable_params: int,
    fit_seconds: float,
    costs: dict,
    hyperparameters: dict,
    params: EvaluateParams,
    train_accuracy: float | None = None,
) -> Scored:
    """The one schema of every model's test metrics, and each test image's answer.

    `describe` names the model (model, strategy, kind, backbone); `sizes` are its train and val images; `costs` what
    running it costs (milliseconds per image, parameters: the report's inference column reads them).
    """
    y_pred = proba.argmax(1)
    record = {
        **describe,
        **classification_metrics(y_true, proba, params.ece_bins),
        **intervals(y_true, y_pred, len(classes), params),
        "n_train": sizes[0],
        "n_val": sizes[1],
        "n_test": len(y_true),
        "trainable_params": trainable_params,
        "fit_seconds": fit_seconds,
        **costs,
        **({} if train_accuracy is None else {"train_accuracy": train_accuracy}),
        "hyperparameters": hyperparameters,
    }
    confidence = [round(float(c), 6) for c in proba.max(axis=1)]
    return Scored(record, list(paths), class_names(y_true, classes), class_names(y_pred, classes), confidence)


PREDICTIONS_HEADER = ("path", "actual", "predicted", "confidence")


def write_model_metrics(folder: Path, scored: Scored) -> str:
    """One model's test metrics, confusion matrix and answers, as files DVC and the report read.

    `folder`/metrics.json holds the record's scores (SCORE_KEYS), which `dvc metrics show` and `dvc metrics diff`
    tabulate; `folder`/details.json the rest of it: the model's description (name, strategy, kind, backbone),
    chosen hyperparameters, timings and counts (`pipeline.core.io.read_record` joins them). `folder`/plots/sklearn/
    confusion.json holds one {actual, predicted} record per test image, for `dvc plots show`. Written as plain
    JSON, in DVCLive's layout: a DVCLive session is slow to start (it opens the DVC repository and reads git),
    too much for a few files (issue 18). `folder`/predictions.csv holds each test
    image's answer: the report compares two models image by image and draws the reliability diagram from it.
    Returns what the stage says of it, in one line.
    """
    write_record(folder, scored.record, SCORE_KEYS)
    confusion = [{"actual": a, "predicted": p} for a, p in zip(scored.actual, scored.predicted, strict=True)]
    write_json(folder / "plots" / "sklearn" / "confusion.json", confusion, indent=4)
    rows = zip(scored.paths, scored.actual, scored.predicted, scored.confidence, strict=True)
    write_csv(folder / "predictions.csv", PREDICTIONS_HEADER, [(p, a, q, f"{c:.6f}") for p, a, q, c in rows])
    r = scored.record
    return (
        f"test accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f} on {r['n_test']} images -> "
        f"{folder / 'metrics.json'}"
    )


def rescored(record: dict, answers: list[dict], classes: list[str], params: EvaluateParams) -> dict:
    """`record` with its test scores computed again on `answers` (a subset of its test images): accuracy,
    macro-F1, their intervals and ECE, from each image's answer. Log loss and balanced accuracy need more than
    the answers hold and are left out."""
    index = {name: i for i, name in enumerate(classes)}
    y_true = np.array([index[a["actual"]] for a in answers], dtype=np.int64)
    y_pred = np.array([index[a["predicted"]] for a in answers], dtype=np.int64)
    confidence = np.array([a["confidence"] for a in answers])
    kept = {k: v for k, v in record.items() if k not in ("log_loss", "balanced_accuracy")}
    return {
        **kept,
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": macro_f1(y_true, y_pred, len(classes)),
        "ece": top_label_ece(confidence, y_true == y_pred, params.ece_bins),
        **intervals(y_true, y_pred, len(classes), params),
        "n_test": len(answers),
    }


def read_predictions(path: Path) -> list[dict]:
    """A model's predictions.csv: one dict per test image (path, actual, predicted, confidence as float)."""
    fix = "run `dvc repro` so that evaluate writes it again"
    if not Path(path).is_file():
        raise PipelineError(f"{path} not found (written by evaluate since it records each test image's answer); {fix}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != PREDICTIONS_HEADER:
            raise PipelineError(f"{path}: columns {reader.fieldnames}, expected {list(PREDICTIONS_HEADER)}; {fix}")
        try:
            return [{**row, "confidence": float(row["confidence"])} for row in reader]
        except ValueError as err:
            raise PipelineError(f"{path}: line {reader.line_num}: {err}; {fix}") from err
