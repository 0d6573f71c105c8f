"""Learning curves: a model's test accuracy against the number of training images per class."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import FinetuneParams, HeadParams
from pipeline.dataset import Manifest, read_manifest, write_manifest
from pipeline.evaluate_finetune import evaluate_finetuned
from pipeline.finetune import finetune
from pipeline.heads import HeadError, TrainedHead, train_head
from pipeline.store import SPLIT_CODES, FeatureStore

log = logging.getLogger(__name__)

ALL = 0  # learning-curve size meaning "every training image"


def best_on_val(heads: list[TrainedHead]) -> TrainedHead:
    """The head whose best grid point scored highest on val (the first in the list on a tie)."""
    return max(heads, key=lambda h: max(c["val_accuracy"] for c in h.val_curve))


def subsample_train(store: FeatureStore, per_class: int, seed: int) -> FeatureStore:
    """The store with at most `per_class` train rows of each class (seeded); val and test rows unchanged."""
    rng = np.random.default_rng(seed)
    keep = store.split != SPLIT_CODES["train"]
    for label in np.unique(store.labels):
        rows = np.flatnonzero((store.split == SPLIT_CODES["train"]) & (store.labels == label))
        keep[rows if per_class == ALL else rng.permutation(rows)[:per_class]] = True
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
    params = HeadParams(kind=head.kind, args=dict(head.hyperparameters), grid={}, refit_on_train_val=False)
    smallest = min(int(((store.split == 0) & (store.labels == c)).sum()) for c in np.unique(store.labels))
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
            x_test, y_test = sub.subset("test")
            scores.append(float((fitted.predict_proba(x_test).argmax(1) == y_test).mean()))
        if scores:
            per_class = smallest if size == ALL else size
            label = "all" if size == ALL else str(size)  # "all": at least `smallest` per class
            points.append(
                {
                    "model": head.name,
                    "per_class": per_class,
                    "label": label,
                    "accuracy": float(np.mean(scores)),
                    "std": float(np.std(scores)),
                }
            )
    return points


def subsample_manifest(manifest: Manifest, per_class: int, seed: int) -> Manifest:
    """Usable rows with at most `per_class` train images of each class (seeded); val and test unchanged."""
    rng = np.random.default_rng(seed)
    ok = manifest.ok_rows()
    keep = [r for r in ok if r.split != "train"]
    for cls in manifest.classes:
        train = [r for r in ok if r.split == "train" and r.class_name == cls]
        keep += [train[i] for i in rng.permutation(len(train))[:per_class]]
    order = {r.path: i for i, r in enumerate(ok)}
    return Manifest(sorted(keep, key=lambda r: order[r.path]), manifest.layout, [])


def finetune_curve(
    manifest_path: Path,
    data_root: Path,
    backbone: str,
    params: FinetuneParams,
    sizes: list[int],
    work: Path,
    *,
    weights: Path | None = None,
) -> list[dict]:
    """Test accuracy of fine-tuning on `sizes` training images per class (one seeded subset each). `work` keeps
    the subsets, models and checkpoints, so a killed run resumes.

    The new layer starts from random weights here: the trained logistic head saw every training image.
    """
    manifest = read_manifest(manifest_path)
    tuned = replace(params, init_head="random")
    points = []
    for size in sizes:
        subset = work / f"manifest-{size}.csv"
        write_manifest(subsample_manifest(manifest, size, params.seed), subset)
        model = work / f"model-{size}"
        finetune(subset, data_root, backbone, tuned, model, work / "checkpoints", weights=weights)
        scores, _, _ = evaluate_finetuned(model, subset, data_root, params=tuned)
        points.append(
            {"model": "finetune", "per_class": size, "label": str(size), "accuracy": scores["accuracy"], "std": 0.0}
        )
    return points
