"""Score the fine-tuned network on the manifest's test split, in the schema every model shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.config import EvaluateParams, FinetuneParams
from pipeline.data.loading import Images, Runtime, image_batches, predict_proba
from pipeline.data.manifest import read_manifest
from pipeline.features.store import StoreError
from pipeline.finetuning.model import load_finetuned
from pipeline.results.metrics import Scored, model_record


def evaluate_finetuned(
    model_dir: Path,
    manifest_path: Path,
    data_root: Path,
    *,
    params: FinetuneParams,
    scoring: EvaluateParams | None = None,
) -> Scored:
    """Test-split metrics of the fine-tuned model, and each test image's answer.

    Decoded and run as fine-tuning validated it: `params` gives the batch size, decoding workers, device and
    precision; `scoring` the calibration bins and the bootstrap (the evaluate section's defaults when None).
    """
    model, config, preprocessing = load_finetuned(model_dir)
    classes = config["classes"]
    manifest = read_manifest(manifest_path)
    if manifest.classes != classes:
        raise StoreError(f"{model_dir} was trained on classes {classes}, the manifest has {manifest.classes}")
    ok = manifest.ok_rows()
    rows = [r for r in ok if r.split == "test"]
    if not rows:
        raise StoreError(f"{manifest_path} has no test images to score; set prepare.test_fraction above 0")
    y_test = np.array([classes.index(r.class_name) for r in rows], dtype=np.int64)
    runtime = Runtime.resolve(params.device, params.precision, option="finetune.device")
    batches = image_batches(
        Images.of_rows(data_root, rows, preprocessing.to_uint8), params.batch_size, params.num_workers, runtime.device
    )
    proba = predict_proba(runtime.place(model), batches, runtime, preprocessing.normalize)
    training, settings = config["training"], config["params"]
    return model_record(
        y_test,
        proba,
        classes,
        [r.path for r in rows],
        describe={"model": "finetune", "strategy": "fine_tuning", "kind": "finetune", "backbone": config["backbone"]},
        sizes=(sum(r.split == "train" for r in ok), sum(r.split == "val" for r in ok)),
        trainable_params=training["trainable_params"],
        fit_seconds=training["train_seconds"],
        hyperparameters={
            "unfreeze": settings["unfreeze"],
            "unfrozen_blocks": config["unfrozen_blocks"],
            "lr": settings["lr"],
            "backbone_lr_mult": settings["backbone_lr_mult"],
            "epochs_run": training["epochs_run"],
            "best_epoch": training["best_epoch"],
            "image_size": config["preprocessing"]["crop"],
        },
        params=scoring or EvaluateParams(),
    )
