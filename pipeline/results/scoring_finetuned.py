"""Score the fine-tuned network on the manifest's test split, in the schema every model shares."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import EvaluateParams, FinetuneParams
from pipeline.finetuning.model import predict_test_split
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
    answers = predict_test_split(model_dir, manifest_path, data_root, params)
    config, ok = answers.config, answers.manifest.ok_rows()
    training, settings = config["training"], config["params"]
    return model_record(
        answers.labels,
        answers.proba,
        config["classes"],
        [r.path for r in answers.rows],
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
