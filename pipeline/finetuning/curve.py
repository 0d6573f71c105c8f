"""The learning curve of fine-tuning: its test accuracy after training on subsets of the training images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.core.config import FinetuneParams
from pipeline.data.manifest import Manifest, read_manifest, write_manifest
from pipeline.features.backbones import build_backbone
from pipeline.finetuning.model import predict_test_split
from pipeline.finetuning.names import FINETUNE
from pipeline.finetuning.training import finetune, with_input_size


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
    # The size is fixed on the whole data set: a subset's images could resolve image_size auto differently.
    tuned = with_input_size(replace(params, init_head="random"), build_backbone(backbone, weights), manifest)
    points = []
    for size in sizes:
        subset = work / f"manifest-{size}.csv"
        write_manifest(subsample_manifest(manifest, size, params.seed), subset)
        model = work / f"model-{size}"
        finetune(subset, data_root, backbone, tuned, model, work / "checkpoints", weights=weights)
        answers = predict_test_split(model, subset, data_root, tuned)
        accuracy = float((answers.proba.argmax(1) == answers.labels).mean())
        points.append({"model": FINETUNE, "per_class": size, "label": str(size), "accuracy": accuracy, "std": 0.0})
    return points
