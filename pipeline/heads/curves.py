"""The learning curve of a head, by the few-shot protocol of the CLIP and CoOp papers: for k train images per class,
its test accuracy when its grid is chosen on min(k, 4) val images per class, over several seeded draws.

Per seed s and k: k train images of each class drawn from the train split and min(k, 4) from the val split (the
few-shot data set; a class with fewer takes every image it has, and the point says so), the head's own grid (params
`heads.<name>.grid`) scored on those val images alone, the chosen point kept as fitted on the k train images (no
refit on the k + min(k, 4) images: CoOp's protocol), then scored on the whole test split. The test split never enters
what selection sees: it reads a store holding the drawn rows only. Seed s draws one order of each class's train and
val rows and takes its first k (min(k, 4)): its draws are nested, its 2 shots hold its 1, so that the curve of one
seed moves with the data added, not with a new draw. Every training image: the head as trained (the head stage's
model, its test score), not a refit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from pipeline.core.config import HeadParams
from pipeline.features.store import FeatureStore
from pipeline.heads.registry import HeadError
from pipeline.heads.selection import train_head
from pipeline.heads.trained import TrainedHead, held_out

log = logging.getLogger(__name__)

VAL_SHOTS = 4  # validation images per class at most (CoOp: min(k, 4)), so that selection stays few-shot


@dataclass(frozen=True)
class ShotOrder:
    """One seed's order of each class's store rows: train and val, each a list indexed by class."""

    train: list[np.ndarray]
    val: list[np.ndarray]

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Store rows of the k-shot data set: the first k train rows and first min(k, VAL_SHOTS) val rows of each
        class (fewer where a class has fewer), each sorted."""
        v = min(k, VAL_SHOTS)
        return np.sort(np.concatenate([r[:k] for r in self.train])), np.sort(np.concatenate([r[:v] for r in self.val]))


def shot_order(store: FeatureStore, seed: int) -> ShotOrder:
    """Each class's train rows and val rows in a seeded random order (rows of the store; never a test row)."""
    rng = np.random.default_rng(seed)
    n_classes = len(store.classes)
    orders = {}
    for split in ("train", "val"):
        rows = store.rows(split)
        labels = store.labels[rows]
        by_class = rows[np.argsort(labels, kind="stable")]
        groups = np.split(by_class, np.cumsum(np.bincount(labels, minlength=n_classes))[:-1])
        orders[split] = [rng.permutation(group) for group in groups]
    return ShotOrder(orders["train"], orders["val"])


def shots_store(store: FeatureStore, train: np.ndarray, val: np.ndarray) -> FeatureStore:
    """What selection reads: the drawn train and val rows, copied, in store order; no test row at all."""
    rows = np.sort(np.concatenate([train, val]))
    return replace(
        store,
        features=store.features[rows],
        labels=store.labels[rows],
        split=store.split[rows],
        paths=[store.paths[i] for i in rows],
        sha256=[store.sha256[i] for i in rows],
    )


def short_classes(store: FeatureStore, order: ShotOrder, k: int) -> list[dict]:
    """The classes with fewer than k train or min(k, 4) val images, with what the k-shot draw takes of them."""
    v = min(k, VAL_SHOTS)
    return [
        {"class": name, "train": min(len(t), k), "val": min(len(w), v)}
        for name, t, w in zip(store.classes, order.train, order.val, strict=True)
        if len(t) < k or len(w) < v
    ]


def learning_curve(
    store: FeatureStore, head: TrainedHead, params: HeadParams, shots: list[int], seeds: int
) -> list[dict]:
    """One record per k of `shots` (seeds' runs: test accuracy, the grid values chosen, their accuracy on the val
    shots) and one for every training image (the head as trained); pipeline.results.few_shot adds the mean and its
    t-interval. `params`: the head's params (its grid, args and seed), chosen on the val shots, never refit."""
    if not store.split_sizes()["val"]:
        raise HeadError(
            "learning_curve: the few-shot protocol draws its validation images from the val split, and the store has "
            "none; set prepare.val_fraction above 0"
        )
    few_shot = replace(params, selection="val", refit_on_train_val=False)
    x_test, y_test = store.subset("test")  # scored, never selected on
    orders = [shot_order(store, seed) for seed in range(seeds)]
    points = []
    for k in sorted(shots):
        short = short_classes(store, orders[0], k)  # class sizes do not depend on the seed
        if short:
            log.warning(
                "learning_curve: %d-shot: %d of %d classes have fewer than %d train or %d val images; all of theirs "
                "are used (%s)", k, len(short), len(store.classes), k, min(k, VAL_SHOTS),
                ", ".join(f"{s['class']}: {s['train']} + {s['val']}" for s in short[:5]),
            )  # fmt: skip
        runs = []
        for seed, order in enumerate(orders):
            try:
                fitted = train_head(shots_store(store, *order.draw(k)), head.name, few_shot)
            except HeadError as err:  # e.g. every k of k-NN's grid above the rows of a 1-shot draw
                log.warning("learning_curve: %d-shot skipped: %s", k, err)
                runs = []
                break
            runs.append(_run(seed, fitted, params, x_test, y_test))
        if runs:
            val = f"the val shots ({min(k, VAL_SHOTS)} per class)"
            points.append(_point(head, k, str(k), min(k, VAL_SHOTS), val, runs, short))
    points.append(_every_image(store, head, params, x_test, y_test))
    return points


def _run(seed: int | None, head: TrainedHead, params: HeadParams, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """One fit's record: its test accuracy, the grid values chosen and their held-out accuracy."""
    return {
        "seed": seed,
        "accuracy": float((head.predict_proba(x_test).argmax(1) == y_test).mean()),
        "chosen": {key: head.hyperparameters[key] for key in params.grid if key in head.hyperparameters},
        "val_accuracy": float(held_out(head)["val_accuracy"]),
    }


def _point(
    head: TrainedHead, per_class: int, label: str, val: int | None, selection: str, runs: list[dict], short: list
) -> dict:
    return {
        "model": head.model_name,
        "label": label,
        "per_class": per_class,
        "val_per_class": val,
        "selection": selection,
        "runs": runs,
        "short_classes": short,
    }


def _every_image(
    store: FeatureStore, head: TrainedHead, params: HeadParams, x_test: np.ndarray, y_test: np.ndarray
) -> dict:
    """The head as the head stage trained and scored it (no refit: the same model, its test accuracy); x: the
    smallest class's images among those it was fitted on (train, or train+val when refit)."""
    fitted = store.rows("train", "val") if params.refit_on_train_val else store.rows("train")
    smallest = int(np.bincount(store.labels[fitted], minlength=len(store.classes)).min())
    run = _run(None, head, params, x_test, y_test)
    return _point(head, smallest, "all", None, head.selection, [run], [])
