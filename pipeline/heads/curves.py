"""The learning curve of a head: its test accuracy against the number of training images per class."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from pipeline.core.config import HeadParams
from pipeline.features.store import SPLIT_CODES, FeatureStore
from pipeline.heads.registry import HeadError
from pipeline.heads.selection import train_head
from pipeline.heads.trained import TrainedHead

log = logging.getLogger(__name__)

ALL = 0  # learning-curve size meaning "every training image"


def subsample_train(store: FeatureStore, per_class: int, seed: int) -> FeatureStore:
    """What a head trains and selects on, with at most `per_class` train rows of each class (seeded): those rows and
    every val row, copied; not the test rows (a head never reads them, and the curve scores the store's own). Every
    training image (`ALL`): the store itself, not a copy of its features."""
    if per_class == ALL:
        return store
    rng = np.random.default_rng(seed)
    keep = store.split == SPLIT_CODES["val"]
    for label in np.unique(store.labels):
        rows = np.flatnonzero((store.split == SPLIT_CODES["train"]) & (store.labels == label))
        keep[rng.permutation(rows)[:per_class]] = True
    return replace(
        store,
        features=store.features[keep],
        labels=store.labels[keep],
        split=store.split[keep],
        paths=[p for p, k in zip(store.paths, keep, strict=True) if k],
        sha256=[h for h, k in zip(store.sha256, keep, strict=True) if k],
    )


def learning_curve(store: FeatureStore, head: TrainedHead, sizes: list[int], seeds: int) -> list[dict]:
    """Test accuracy of the head's kind and chosen hyperparameters against training images per class: the mean
    and spread over `seeds` random subsets of each size, and every training image ("all")."""
    # One grid point, nothing to choose: fitted on the train subset, scored on test (val is not needed).
    params = HeadParams(
        kind=head.kind, args=dict(head.hyperparameters), grid={}, refit_on_train_val=False, selection="val"
    )
    smallest = min(int(((store.split == 0) & (store.labels == c)).sum()) for c in np.unique(store.labels))
    x_test, y_test = store.subset("test")  # once: the subsets leave the test rows out
    points = []
    for size in sorted({s for s in sizes if 0 < s < smallest} | {ALL}, key=lambda s: s or 10**9):
        scores = []
        for seed in range(1 if size == ALL else seeds):
            sub = subsample_train(store, size, seed)
            try:
                fitted = train_head(sub, head.name, replace(params, seed=seed))
            except HeadError as err:  # e.g. k-NN's k above the rows of a tiny subset
                log.info("learning curve: %d per class skipped: %s", size, err)
                break
            scores.append(float((fitted.predict_proba(x_test).argmax(1) == y_test).mean()))
        if scores:
            per_class = smallest if size == ALL else size
            label = "all" if size == ALL else str(size)  # "all": at least `smallest` per class
            points.append(
                {
                    "model": head.model_name,
                    "per_class": per_class,
                    "label": label,
                    "accuracy": float(np.mean(scores)),
                    "std": float(np.std(scores)),
                }
            )
    return points
