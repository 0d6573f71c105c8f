"""Score the fine-tuned network on the manifest's test split, in the schema every model shares."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import EvaluateParams, FinetuneParams
from pipeline.data.loading import Runtime
from pipeline.features.inference_cost import count_parameters, forward_ms_per_row, random_features, random_images
from pipeline.finetuning.model import load_finetuned, predict_test_split
from pipeline.finetuning.names import model_name
from pipeline.results.metrics import TRAIN_ACCURACY_ROWS, Scored, model_record


def evaluate_finetuned(
    model_dir: Path,
    manifest_path: Path,
    data_root: Path,
    *,
    params: FinetuneParams,
    scoring: EvaluateParams | None = None,
) -> Scored:
    """Test-split metrics of the fine-tuned model (finetune, or finetune-wise for a folder the finetune_wise stage
    wrote: its details then hold the chosen alpha and the val curve, and its accuracy on the train images, at most
    TRAIN_ACCURACY_ROWS of them), and each test image's answer.

    Decoded and run as fine-tuning validated it: `params` gives the batch size, decoding workers, device and
    precision; `scoring` the calibration bins and the bootstrap (the evaluate section's defaults when None).
    """
    answers = predict_test_split(model_dir, manifest_path, data_root, params)
    config, ok = answers.config, answers.manifest.ok_rows()
    training, settings, wise = config["training"], config["params"], config.get("wise")
    on_train = None
    if wise:  # the mixed network's own, not the fine-tuned one's during its best epoch (what finetune's row quotes)
        seen = predict_test_split(
            model_dir, manifest_path, data_root, params, split="train", at_most=TRAIN_ACCURACY_ROWS
        )
        on_train = float((seen.proba.argmax(1) == seen.labels).mean())
    scored = model_record(
        answers.labels,
        answers.proba,
        config["classes"],
        [r.path for r in answers.rows],
        describe={
            "model": model_name(config),
            "strategy": "fine_tuning",
            "kind": model_name(config),
            "backbone": config["backbone"],
        },
        sizes=(sum(r.split == "train" for r in ok), sum(r.split == "val" for r in ok)),
        trainable_params=training["trainable_params"],
        fit_seconds=round(training["train_seconds"] + (wise["seconds"] if wise else 0.0), 3),
        costs=inference_costs(model_dir, params),
        hyperparameters={
            "unfreeze": settings["unfreeze"],
            "unfrozen_blocks": config["unfrozen_blocks"],
            "lr": settings["lr"],
            "backbone_lr_mult": settings["backbone_lr_mult"],
            "epochs_run": training["epochs_run"],
            "best_epoch": training["best_epoch"],
            "image_size": config["preprocessing"]["crop"],
            **({"wise_alpha": wise["alpha"]} if wise else {}),
        },
        params=scoring or EvaluateParams(),
        train_accuracy=on_train,
    )
    if wise:  # how alpha was chosen, beside the scores (details.json)
        scored.record["wise"] = {k: wise[k] for k in ("alpha", "chosen_by", "n_val", "seconds", "curve")}
    return scored


def inference_costs(model_dir: Path, params: FinetuneParams) -> dict:
    """The fine-tuned network's forward milliseconds per image, whole and its output layer alone, on the device and
    at the precision it was scored with, and its parameters. The report adds the layer's cost to the extract stage's
    measurement of the same backbone at the same size, and quotes the whole network's otherwise."""
    model, _, preprocessing = load_finetuned(model_dir)
    runtime = Runtime.resolve(params.device, params.precision, option="finetune.device")
    model = runtime.place(model)
    whole = forward_ms_per_row(model, random_images(runtime, preprocessing), runtime)
    layer = forward_ms_per_row(model.head, random_features(runtime, model.head.in_features), runtime)
    return {
        "forward_ms_per_image": round(whole, 6),
        "head_ms_per_image": round(layer, 6),
        "params_total": count_parameters(model),
    }
