"""Train a head on cached features: every grid point fitted on train and scored on val, the best refit on
train+val (the linear-probe protocol of the CLIP paper). The test split is never read here."""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import Pipeline

from pipeline.config import HeadParams
from pipeline.estimators import TemperatureScaled
from pipeline.heads import HEADS, STORE_ATTRS, HeadError, HeadKind, TrainedHead, full_proba
from pipeline.store import FeatureStore

log = logging.getLogger(__name__)


def check_head_params(name: str, params: HeadParams) -> HeadKind:
    """The head's kind, once its args and grid are known arguments of its estimator; errors name the key."""
    if params.kind not in HEADS:
        raise HeadError(f"heads.{name}.kind: unknown head '{params.kind}'; valid: {', '.join(HEADS)}")
    kind = HEADS[params.kind]
    valid = kind.arg_names()
    for section, keys in (("args", params.args), ("grid", params.grid)):
        for key in keys:
            if key not in valid:
                hint = " (it does not apply: this head has no loss to weight)" if key == "class_weight" else ""
                raise HeadError(
                    f"heads.{name}.{section}.{key}: not an argument of {kind.estimator.__name__}, the "
                    f"'{params.kind}' head{hint}; valid: {', '.join(valid) or 'none'}"
                )
    for key, values in params.grid.items():
        if not values:
            raise HeadError(f"heads.{name}.grid.{key}: empty list; give at least one value or remove the key")
        if key in params.args:
            raise HeadError(f"heads.{name}: '{key}' is both in args and in grid; keep one")
    return kind


def train_head(store: FeatureStore, name: str, params: HeadParams) -> TrainedHead:
    """Choose the grid point with the best val accuracy (ties: lower val log loss, then the first in
    ascending grid order), then refit it on train+val (`params.refit_on_train_val`). The test split is
    never read. Heads without probabilities of their own get a temperature fitted on val for each grid
    point with the model trained on train; the chosen point's temperature is kept for the refit model.
    """
    kind = check_head_params(name, params)
    x_train, y_train = store.subset("train")
    x_val, y_val = store.subset("val")
    if len(y_train) == 0 or len(y_val) == 0:
        raise HeadError(
            f"heads.{name}: the store has {len(y_train)} train and {len(y_val)} val rows; selecting on val "
            "needs both (see prepare.val_fraction)"
        )
    n_classes = len(store.classes)
    fixed = {**kind.defaults, **params.args}
    if "random_state" in kind.arg_names() and "random_state" not in fixed:
        fixed["random_state"] = params.seed
    start = time.perf_counter()
    curve, best, model = _sweep(kind, fixed, params.grid, (x_train, y_train), (x_val, y_val), n_classes, name)
    chosen = {k: best[k] for k in params.grid}
    if params.refit_on_train_val:
        x_fit, y_fit = store.subset("train", "val")
        model = _fit(kind, {**fixed, **chosen}, x_fit, y_fit, name, temperature=best.get("temperature"))
    fit_seconds = time.perf_counter() - start
    log.info("head %s: chose %s (val accuracy %.4f) in %.1fs", name, chosen, best["val_accuracy"], fit_seconds)
    return TrainedHead(
        name=name,
        kind=params.kind,
        model=model,
        classes=store.classes,
        store_fingerprint=store.fingerprint,
        hyperparameters={**fixed, **chosen},
        val_curve=curve,
        fit_seconds=fit_seconds,
        n_train=len(y_train),
        n_val=len(y_val),
        store_attrs={key: store.attrs.get(key) for key in STORE_ATTRS},
        manifest_sha256=store.attrs.get("manifest_sha256"),
    )


def _sweep(
    kind: HeadKind,
    fixed: dict,
    grid: dict[str, list[float]],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    name: str,
) -> tuple[list[dict], dict, Pipeline]:
    """Fit each grid point on train and score it on val: the curve, the best point's record and its model."""
    curve, best, best_model = [], None, None
    for point in _grid_points(kind, grid):
        if _too_big(kind, {**fixed, **point}, len(train[1]), name):
            continue
        model = _fit(kind, {**fixed, **point}, *train, name)
        record = {**point, **_val_scores(model, *val, n_classes)}
        curve.append(record)
        if best is None or _rank(record) > _rank(best):
            best, best_model = record, model
    if best is None:
        bounded = ", ".join(kind.row_bounded)
        raise HeadError(f"heads.{name}.grid: every value of {bounded} exceeds the {len(train[1])} train rows")
    return curve, best, best_model


def _grid_points(kind: HeadKind, grid: dict[str, list[float]]) -> list[dict]:
    """Every combination, each axis ascending (so the curve plots in order)."""
    keys = sorted(grid)
    axes = [sorted(_as_argument(kind, k, v) for v in grid[k]) for k in keys]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes)]


def _as_argument(kind: HeadKind, key: str, value: float) -> float | int:
    # params.yaml grids are read as floats; an integer argument (n_neighbors) wants 5, not 5.0.
    default = kind.estimator().get_params(deep=False)[key]
    is_int = isinstance(default, int) and not isinstance(default, bool)
    return int(value) if is_int and float(value).is_integer() else value


def _too_big(kind: HeadKind, point: dict, n_rows: int, name: str) -> bool:
    for key in kind.row_bounded:
        if key in point and point[key] > n_rows:
            log.warning("heads.%s.grid.%s: %s exceeds the %d train rows; skipped", name, key, point[key], n_rows)
            return True
    return False


def _rank(record: dict) -> tuple[float, float]:
    return record["val_accuracy"], -record["val_log_loss"]


def _fit(
    kind: HeadKind, args: dict, x: np.ndarray, y: np.ndarray, name: str, temperature: float | None = None
) -> Pipeline:
    model = kind.build(args)
    if temperature is not None:
        model.set_params(clf__temperature=temperature)
    try:
        return model.fit(x, y)
    except (TypeError, ValueError) as err:  # a bad value (scikit-learn's InvalidParameterError is both)
        raise HeadError(f"heads.{name}: {kind.estimator.__name__} could not be fitted with {args}: {err}") from err


def _val_scores(model: Pipeline, x_val: np.ndarray, y_val: np.ndarray, n_classes: int) -> dict[str, float]:
    """Val accuracy and log loss; a calibrated head first fits its temperature on these rows."""
    step = model.steps[-1][1]
    extra = {}
    if isinstance(step, TemperatureScaled):
        x = x_val
        for _, transform in model.steps[:-1]:
            x = transform.transform(x)
        step.calibrate(x, y_val)
        extra["temperature"] = step.temperature_
    proba = full_proba(model, x_val, n_classes)
    return {
        "val_accuracy": float(accuracy_score(y_val, proba.argmax(1))),
        "val_log_loss": float(log_loss(y_val, proba, labels=np.arange(n_classes))),
        **extra,
    }
