"""Train a head on cached features: every grid point scored on held-out rows, the best refit on train+val (the
linear-probe protocol of the CLIP paper). Held out: the val split, or, when val is too small to separate grid
points, the folds of a stratified k-fold cross-validation on train+val. The test split is never read here."""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline

from pipeline.core.config import HeadParams
from pipeline.features.store import FeatureStore
from pipeline.heads.estimators import TemperatureScaled
from pipeline.heads.registry import HEADS, HeadError, HeadKind
from pipeline.heads.trained import STORE_ATTRS, TrainedHead, full_proba, grid_rank

log = logging.getLogger(__name__)

# Below this many val images, `selection: auto` chooses by cross-validation on train+val. One val image moves
# val accuracy by 1/n: on a small val split, grid points (and heads) tie, or one image separates them. The 95%
# interval of a 93% accuracy spans +-3 points on 300 images and still +-1.6 on 1000. Cross-validation scores each
# point on every train+val image instead, at k fits per point: cheap on cached features at these sizes, and
# skipped at a million images, where val alone resolves a tenth of a point.
MIN_VAL_IMAGES = 1000


def check_head_params(name: str, params: HeadParams) -> HeadKind:
    """The head's kind, once its args and grid are known arguments of its estimator; errors name the key."""
    if params.kind not in HEADS:
        raise HeadError(f"heads.{name}.kind: unknown head '{params.kind}'; valid: {', '.join(HEADS)}")
    kind = HEADS[params.kind]
    valid = kind.arg_names()
    if params.cv_folds < 2:
        raise HeadError(f"heads.{name}.cv_folds must be >= 2; got {params.cv_folds}")
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
    """Choose the grid point with the best held-out accuracy (ties: lower held-out log loss, then the first
    in ascending grid order), then refit it on train+val (`params.refit_on_train_val`). Held out: the val
    split, or the folds of a cross-validation on train+val (`selection_method`). The test split is never read.
    Heads without probabilities of their own get a temperature fitted on the held-out rows of each fit; the
    chosen point's temperature (the median over folds) is kept for the refit model.
    """
    kind = check_head_params(name, params)
    x_train, y_train = store.subset("train")
    x_val, y_val = store.subset("val")
    if len(y_train) == 0 or len(y_val) == 0:
        raise HeadError(
            f"heads.{name}: the store has {len(y_train)} train and {len(y_val)} val rows; selecting a head "
            "needs both (see prepare.val_fraction)"
        )
    n_classes = len(store.classes)
    fixed = {**kind.defaults, **params.args}
    if "random_state" in kind.arg_names() and "random_state" not in fixed:
        fixed["random_state"] = params.seed
    if "device" in kind.arg_names() and "device" not in fixed:
        fixed["device"] = params.device
    x_fit, y_fit = store.subset("train", "val")
    folds, how = selection_method(params, y_fit, len(y_val))
    start = time.perf_counter()
    held_out = _fits_and_held_out((x_train, y_train), (x_val, y_val), (x_fit, y_fit), folds, params.seed)
    curve, best, model = _sweep(kind, fixed, params.grid, held_out, n_classes, name)
    chosen = {k: best[k] for k in params.grid}
    if params.refit_on_train_val or folds:  # cross-validation's fold models are not kept
        x_refit, y_refit = (x_fit, y_fit) if params.refit_on_train_val else (x_train, y_train)
        with _explained_ill_conditioning(name, chosen):
            model = _fit(kind, {**fixed, **chosen}, x_refit, y_refit, name, temperature=best.get("temperature"))
    if kind.reads_store:  # search the fitted rows where they lie in the store: its file keeps their row numbers
        splits = ("train", "val") if params.refit_on_train_val else ("train",)
        model[-1].use_store_rows(store.features, store.rows(*splits))
    fit_seconds = time.perf_counter() - start
    log.debug("head %s: chose %s (held-out accuracy %.4f, %s)", name, chosen, best["val_accuracy"], how)
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
        selection=how,
        backbone=store.attrs.get("label", ""),
    )


def _fits_and_held_out(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    train_val: tuple[np.ndarray, np.ndarray],
    folds: int,
    seed: int,
) -> list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """(rows to fit, rows to score) pairs: train and val, or the `folds` stratified folds of train+val (in
    store order)."""
    if not folds:
        return [(train, val)]
    x, y = train_val
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)
    return [((x[a], y[a]), (x[b], y[b])) for a, b in splits]


def selection_method(params: HeadParams, y_fit: np.ndarray, n_val: int) -> tuple[int, str]:
    """Where grid points are scored: the number of cross-validation folds (0: the val split), and the held-out
    rows in words. k-fold needs k rows of every class: k is lowered to the smallest class's count, and below 2
    the val split scores (the words say why). A single grid point is scored the same way, so that heads
    trained on one store compare on the same rows."""
    wants_cv = params.selection == "cv" or (params.selection == "auto" and n_val < MIN_VAL_IMAGES)
    if not wants_cv:
        return 0, f"the val split ({n_val} images)"
    smallest = int(np.unique(y_fit, return_counts=True)[1].min())  # train and val are not empty here
    folds = min(params.cv_folds, smallest)
    if folds < 2:
        return 0, f"the val split ({n_val} images; a class has one train+val image, too few to cross-validate)"
    why = f"; val has {n_val}, fewer than {MIN_VAL_IMAGES}" if params.selection == "auto" else ""
    return folds, f"{folds}-fold cross-validation on train+val ({len(y_fit)} images, seed {params.seed}{why})"


def _sweep(
    kind: HeadKind,
    fixed: dict,
    grid: dict[str, list[float]],
    held_out: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
    n_classes: int,
    name: str,
) -> tuple[list[dict], dict, Pipeline]:
    """Fit every grid point on each (fit rows, held-out rows) pair and score it on the held-out rows: the curve
    (one record per point: mean held-out accuracy and log loss, their spread over folds), the best point's
    record and its model fitted on the first pair. A kind with a sweep of its own (`HeadKind.sweep`) fits the
    whole grid of a pair at once, reusing its work from point to point; the others fit point by point."""
    smallest_fit = min(len(fit[1]) for fit, _ in held_out)
    points = [p for p in _grid_points(kind, grid) if not _too_big(kind, {**fixed, **p}, smallest_fit, name)]
    if not points:
        bounded = ", ".join(kind.row_bounded)
        raise HeadError(
            f"heads.{name}.grid: every value of {bounded} exceeds the {smallest_fit} rows a point is fitted on"
        )
    if kind.sweep is None:
        fitted = _point_by_point(kind, fixed, points, held_out, n_classes, name)
    else:
        fitted = [kind.sweep(kind, fixed, points, fit, out, n_classes, name) for fit, out in held_out]
    curve, best, best_model = [], None, None
    for i, point in enumerate(points):
        scores = [_scores(proba, y_out, n_classes, model) for (model, proba), (_, (_, y_out)) in
                  zip((fold[i] for fold in fitted), held_out, strict=True)]  # fmt: skip
        record = {**point, **_pooled(scores, [len(y_out) for _, (_, y_out) in held_out])}
        curve.append(record)
        if best is None or grid_rank(record) > grid_rank(best):
            best, best_model = record, fitted[0][i][0]
    return curve, best, best_model


def _point_by_point(
    kind: HeadKind,
    fixed: dict,
    points: list[dict],
    held_out: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
    n_classes: int,
    name: str,
) -> list[list[tuple[Pipeline, np.ndarray]]]:
    """The plain sweep: each point fitted from scratch on each pair's fit rows, then its probabilities on the
    pair's held-out rows (`held_out_proba`); an ill-conditioned point is explained once, whatever the folds."""
    fitted: list[list[tuple[Pipeline, np.ndarray]]] = [[] for _ in held_out]
    for point in points:
        with _explained_ill_conditioning(name, point):
            for pair, ((x, y), (x_out, y_out)) in zip(fitted, held_out, strict=True):
                model = _fit(kind, {**fixed, **point}, x, y, name)
                pair.append((model, held_out_proba(model, x_out, y_out, n_classes)))
    return fitted


def _pooled(scores: list[dict[str, float]], sizes: list[int]) -> dict[str, float]:
    """One held-out record from one score per fold: accuracy and log loss over every held-out image (fold
    means weighted by fold size, so that one image counts the same in every fold), the median temperature;
    with folds, the spread of the fold accuracies too."""
    record = {
        key: float(np.average([s[key] for s in scores], weights=sizes)) for key in ("val_accuracy", "val_log_loss")
    }
    if "temperature" in scores[0]:
        record["temperature"] = float(np.median([s["temperature"] for s in scores]))
    if len(scores) > 1:
        record["val_accuracy_std"] = float(np.std([s["val_accuracy"] for s in scores]))
    return record


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
            log.warning(
                "heads.%s.grid.%s: %s exceeds the %d rows a point is fitted on; skipped", name, key, point[key], n_rows
            )
            return True
    return False


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


def _ill_conditioned(w: warnings.WarningMessage) -> bool:
    """scipy's warning that a solve is ill-conditioned, or scikit-learn's that it was singular (ridge's dual
    solver then falls back to least squares)."""
    singular = issubclass(w.category, UserWarning) and str(w.message).startswith("Singular matrix")
    return issubclass(w.category, LinAlgWarning) or singular


@contextmanager
def _explained_ill_conditioning(name: str, point: dict) -> Iterator[None]:
    """Say once, in words, when a grid point's least-squares system is ill-conditioned (ridge with a small
    alpha on about as many features as rows), instead of a library warning per fit. Such a fit may be inexact;
    its held-out score decides whether it is used. Other warnings pass through unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if any(_ill_conditioned(w) for w in caught):
        log.info(
            "heads.%s: %s: ill-conditioned least squares (the solver warned), so this fit may be inexact; its "
            "held-out score decides whether it is used",
            name,
            point or "the fit",
        )
    for w in caught:
        if not _ill_conditioned(w):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def held_out_proba(model: Pipeline, x_out: np.ndarray, y_out: np.ndarray, n_classes: int) -> np.ndarray:
    """The model's probabilities for every class on held-out rows; a calibrated head (TemperatureScaled) first fits
    its temperature on these very rows."""
    step = model.steps[-1][1]
    if isinstance(step, TemperatureScaled):
        x = x_out
        for _, transform in model.steps[:-1]:
            x = transform.transform(x)
        step.calibrate(x, y_out)
    return full_proba(model, x_out, n_classes)


def _scores(proba: np.ndarray, y_out: np.ndarray, n_classes: int, model: Pipeline) -> dict[str, float]:
    """Held-out accuracy and log loss, and a calibrated head's temperature."""
    step = model.steps[-1][1]
    extra = {"temperature": step.temperature_} if isinstance(step, TemperatureScaled) else {}
    return {
        "val_accuracy": float(accuracy_score(y_out, proba.argmax(1))),
        "val_log_loss": float(log_loss(y_out, proba, labels=np.arange(n_classes))),
        **extra,
    }
