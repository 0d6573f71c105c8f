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
from pipeline.features.store import SPLIT_CODES, FeatureStore
from pipeline.heads.estimators import TemperatureScaled
from pipeline.heads.linear import solver_device
from pipeline.heads.registry import HEADS, HeadError, HeadKind
from pipeline.heads.ridge import IllConditioned
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
    y_train, y_val, y_fit = _labels(store, "train"), _labels(store, "val"), _labels(store, "train", "val")
    if len(y_train) == 0 or len(y_val) == 0:
        raise HeadError(
            f"heads.{name}: the store has {len(y_train)} train and {len(y_val)} val rows; selecting a head "
            "needs both (see prepare.val_fraction)"
        )
    n_classes = len(store.classes)
    fixed = {**kind.defaults, **params.args}
    if "random_state" in kind.arg_names() and "random_state" not in fixed:
        fixed["random_state"] = params.seed
    if "device" in kind.arg_names() and "device" not in fixed:  # an estimator that places its own work (knn)
        fixed["device"] = params.device
    folds, how = selection_method(params, y_fit, len(y_val))
    on = _where(kind, params, name, len(y_fit), store.features.shape[1], n_classes)
    start = time.perf_counter()
    held_out = _fits_and_held_out(store, folds, params.seed)
    curve, best, model = _sweep(kind, fixed, params.grid, held_out, n_classes, name, on)
    del held_out  # the sweep's rows go before the refit's come: the features and one working copy at a time
    chosen = {k: best[k] for k in params.grid}
    if params.refit_on_train_val or folds:  # cross-validation's fold models are not kept
        refit_rows = store.subset("train", "val") if params.refit_on_train_val else store.subset("train")
        with _explained_ill_conditioning(name, chosen):
            model = _refit(kind, {**fixed, **chosen}, refit_rows, name, model, best.get("temperature"), on)
        del refit_rows
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


def _labels(store: FeatureStore, *splits: str) -> np.ndarray:
    """The labels of the rows in `splits`, in store order (store.subset's, without copying their features)."""
    return store.labels[np.isin(store.split, [SPLIT_CODES[s] for s in splits])]


def _where(kind: HeadKind, params: HeadParams, name: str, rows: int, features: int, n_classes: int) -> dict:
    """The device argument of a kind whose solvers run on CUDA too (`HeadKind.gpu`), from heads.<name>.device:
    auto picks CUDA when the driver is there and the work is worth it. device: cuda without CUDA is an error, for
    any kind; the other kinds run on the CPU."""
    option = f"heads.{name}.device"
    if not kind.gpu:
        places_itself = "device" in kind.arg_names()  # its estimator takes the setting (knn's search)
        if params.device == "cuda" and not places_itself and solver_device("cuda", option, 0) == "cuda":
            log.info("%s: the %s head has no CUDA solver; it runs on the CPU", option, params.kind)
        return {}
    device = solver_device(params.device, option, rows * features * (1 if n_classes == 2 else n_classes))
    log.debug("heads.%s: fitted on %s", name, device)
    return {"device": device}


def _fits_and_held_out(
    store: FeatureStore, folds: int, seed: int
) -> list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]]:
    """(rows to fit, rows to score) pairs: train and val, or the `folds` stratified folds of train+val (in
    store order)."""
    if not folds:
        return [(store.subset("train"), store.subset("val"))]
    x, y = store.subset("train", "val")
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
    on: dict,
) -> tuple[list[dict], dict, Pipeline]:
    """Fit every grid point on each (fit rows, held-out rows) pair and score it on the held-out rows: the curve
    (one record per point: mean held-out accuracy and log loss, their spread over folds), the best point's
    record and its model fitted on the first pair. A kind with a sweep of its own (`HeadKind.sweep`) fits the
    whole grid of a pair at once, reusing its work from point to point (`on`: its device); the others, and the
    arguments it cannot sweep, fit point by point."""
    smallest_fit = min(len(fit[1]) for fit, _ in held_out)
    points = [p for p in _grid_points(kind, grid) if not _too_big(kind, {**fixed, **p}, smallest_fit, name)]
    if not points:
        bounded = ", ".join(kind.row_bounded)
        raise HeadError(
            f"heads.{name}.grid: every value of {bounded} exceeds the {smallest_fit} rows a point is fitted on"
        )
    fitted = _swept(kind, fixed, points, held_out, n_classes, name, on) if kind.sweep is not None else None
    if fitted is None:
        fitted = _point_by_point(kind, fixed, points, held_out, n_classes, name)
    curve, best, best_model = [], None, None
    for i, point in enumerate(points):
        scores = [fold[i][1] for fold in fitted]
        record = {**point, **_pooled(scores, [len(y_out) for _, (_, y_out) in held_out])}
        curve.append(record)
        if best is None or grid_rank(record) > grid_rank(best):
            best, best_model = record, fitted[0][i][0]
    return curve, best, best_model


def _swept(
    kind: HeadKind,
    fixed: dict,
    points: list[dict],
    held_out: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
    n_classes: int,
    name: str,
    on: dict,
) -> list[list[tuple[Pipeline, dict]]] | None:
    """The kind's own sweep on each pair, each point's (model, held-out scores) as it comes (its probabilities are
    not kept); None where it cannot sweep these arguments. Every point is checked before any fit; an
    ill-conditioned point is explained once, whatever the folds."""
    for point in points:
        with _fit_errors(kind, name, {**fixed, **point}):
            kind.check({**fixed, **point})
    fitted = []
    with _explained_ill_conditioning(name, None):
        for fit, (x_out, y_out) in held_out:
            with _fit_errors(kind, name, fixed):
                sweep = kind.sweep(kind, fixed, points, fit, (x_out, y_out), n_classes, name, **on)
                if sweep is None:
                    return None
                fitted.append([(model, _scores(proba, y_out, n_classes, model)) for model, proba in sweep])
    return fitted


def _point_by_point(
    kind: HeadKind,
    fixed: dict,
    points: list[dict],
    held_out: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
    n_classes: int,
    name: str,
) -> list[list[tuple[Pipeline, dict]]]:
    """The plain sweep: each point fitted from scratch on each pair's fit rows, then scored on the pair's
    held-out rows (`held_out_proba`); an ill-conditioned point is explained once, whatever the folds."""
    fitted: list[list[tuple[Pipeline, dict]]] = [[] for _ in held_out]
    for point in points:
        with _explained_ill_conditioning(name, point):
            for pair, ((x, y), (x_out, y_out)) in zip(fitted, held_out, strict=True):
                model = _fit(kind, {**fixed, **point}, x, y, name)
                proba = held_out_proba(model, x_out, y_out, n_classes)
                pair.append((model, _scores(proba, y_out, n_classes, model)))
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
    with _fit_errors(kind, name, args):
        return model.fit(x, y)


def _refit(
    kind: HeadKind,
    args: dict,
    rows: tuple[np.ndarray, np.ndarray],
    name: str,
    start: Pipeline,
    temperature: float | None,
    on: dict,
) -> Pipeline:
    """The chosen point fitted on `rows` by the kind's own refit (warm-started from `start`, the grid's model of
    that point), or by its fit; a calibrated head keeps `temperature`."""
    if kind.refit is not None:
        with _fit_errors(kind, name, args):
            model = kind.refit(kind, args, rows, name, start=start, temperature=temperature, **on)
        if model is not None:
            return model
    return _fit(kind, args, *rows, name, temperature=temperature)


@contextmanager
def _fit_errors(kind: HeadKind, name: str, args: dict) -> Iterator[None]:
    """A bad value (scikit-learn's InvalidParameterError is both a TypeError and a ValueError) as one line naming
    the head and its arguments."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise HeadError(f"heads.{name}: {kind.estimator.__name__} could not be fitted with {args}: {err}") from err


def _ill_conditioned(w: warnings.WarningMessage) -> bool:
    """scipy's warning that a solve is ill-conditioned, or scikit-learn's that it was singular (ridge's dual
    solver then falls back to least squares)."""
    singular = issubclass(w.category, UserWarning) and str(w.message).startswith("Singular matrix")
    return issubclass(w.category, LinAlgWarning) or singular


@contextmanager
def _explained_ill_conditioning(name: str, point: dict | None) -> Iterator[None]:
    """Say once, in words, when a grid point's least-squares system is ill-conditioned (ridge with a small
    alpha on about as many features as rows), instead of a library warning per fit. Such a fit may be inexact;
    its held-out score decides whether it is used. Other warnings pass through unchanged. `point`: the point
    fitted inside, or None for a sweep, whose warnings name their points (pipeline.heads.ridge.IllConditioned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    explained: list = []
    for w in caught:
        which = w.message.point if isinstance(w.message, IllConditioned) else point
        if _ill_conditioned(w) and which not in explained:
            explained.append(which)
            log.info(
                "heads.%s: %s: ill-conditioned least squares (the solver warned), so this fit may be inexact; its "
                "held-out score decides whether it is used",
                name,
                which or "the fit",
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
