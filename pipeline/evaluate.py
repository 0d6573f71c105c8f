"""Score a trained model on the test split, once, in the schema every model shares."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.backbones import resolve_device
from pipeline.dataset import image_batches, read_manifest
from pipeline.extract import resolve_precision
from pipeline.finetune import LabelledImages, load_finetuned, predict_proba
from pipeline.heads import load_head
from pipeline.metrics import classification_metrics, confusion_rows
from pipeline.store import StoreError, read_store


def evaluate_head(store_path: Path, head_path: Path, ece_bins: int = 15) -> tuple[dict, list[dict]]:
    """Test-split metrics of a head on its feature store, and the per-image confusion records."""
    store = read_store(store_path)
    head = load_head(head_path, store)
    x_test, y_test = store.subset("test")
    if len(y_test) == 0:
        raise StoreError(f"{store_path} has no test images to score; set prepare.test_fraction above 0")
    proba = head.predict_proba(x_test)
    metrics = {
        "model": head.name,
        "strategy": "feature_extraction",
        "kind": head.kind,
        "backbone": store.attrs["backbone"],
        **classification_metrics(y_test, proba, ece_bins),
        "n_train": head.n_train,
        "n_val": head.n_val,
        "n_test": len(y_test),
        "trainable_params": head.trainable_params,
        "fit_seconds": round(head.fit_seconds, 3),
        "hyperparameters": head.hyperparameters,
    }
    return metrics, confusion_rows(y_test, proba.argmax(1), store.classes)


def evaluate_finetuned(
    model_dir: Path,
    manifest_path: Path,
    data_root: Path,
    ece_bins: int = 15,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "auto",
) -> tuple[dict, list[dict]]:
    """Test-split metrics of the fine-tuned model, in the same schema as the heads'.

    `num_workers` decoding processes are used on an accelerator; on CPU, threads decode between forward
    passes (`dataset.image_batches`).
    """
    model, config, preprocessing = load_finetuned(model_dir)
    classes = config["classes"]
    manifest = read_manifest(manifest_path)
    if manifest.classes != classes:
        raise StoreError(f"{model_dir} was trained on classes {classes}, the manifest has {manifest.classes}")
    rows = [r for r in manifest.ok_rows() if r.split == "test"]
    if not rows:
        raise StoreError(f"{manifest_path} has no test images to score; set prepare.test_fraction above 0")
    labels = torch.tensor([classes.index(r.class_name) for r in rows])
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    dataset = LabelledImages(data_root, rows, labels, preprocessing.to_uint8)
    loader = image_batches(dataset, batch_size, num_workers, dev)
    proba = predict_proba(model.to(dev), loader, preprocessing, dev, prec)
    y_test = labels.numpy()
    training = config["training"]
    metrics = {
        "model": "finetune",
        "strategy": "fine_tuning",
        "kind": "finetune",
        "backbone": config["backbone"],
        **classification_metrics(y_test, proba, ece_bins),
        "n_train": sum(r.split == "train" for r in manifest.ok_rows()),
        "n_val": sum(r.split == "val" for r in manifest.ok_rows()),
        "n_test": len(y_test),
        "trainable_params": training["trainable_params"],
        "fit_seconds": training["train_seconds"],
        "hyperparameters": {
            "unfreeze": config["params"]["unfreeze"],
            "unfrozen_blocks": config["unfrozen_blocks"],
            "lr": config["params"]["lr"],
            "backbone_lr_mult": config["params"]["backbone_lr_mult"],
            "epochs_run": training["epochs_run"],
            "best_epoch": training["best_epoch"],
            "image_size": config["preprocessing"]["crop"],
        },
    }
    return metrics, confusion_rows(y_test, proba.argmax(1), classes)
