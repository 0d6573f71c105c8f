"""Fine-tuning: a new output layer on a pre-trained backbone whose last blocks are unfrozen and retrained."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from pipeline.backbones import PIXELS_VERSION, Backbone, Preprocessing, build_backbone, resolve_device
from pipeline.config import FinetuneParams
from pipeline.dataset import ImageDataset, Manifest, ManifestRow, manifest_sha256, read_manifest
from pipeline.errors import PipelineError
from pipeline.extract import resolve_precision
from pipeline.heads import TrainedHead

log = logging.getLogger(__name__)

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FinetuneError(PipelineError):
    """Fine-tuning cannot start: e.g. a warm-start head trained on other classes or another backbone."""


class Classifier(nn.Module):
    """A backbone's feature extractor followed by a new output layer."""

    def __init__(self, features: nn.Module, feature_dim: int, n_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class Frozen:
    """Which blocks train and which stay as pre-trained."""

    trainable: list[nn.Module]  # backbone blocks that train, first to last
    frozen: list[nn.Module]


def freeze(model: Classifier, blocks: list[nn.Module], unfreeze: int | str) -> Frozen:
    """Freeze every backbone parameter, then unfreeze the last `unfreeze` blocks (or all); the head trains."""
    k = len(blocks) if unfreeze == "all" else min(int(unfreeze), len(blocks))
    trainable, frozen = blocks[len(blocks) - k :], blocks[: len(blocks) - k]
    model.features.requires_grad_(False)
    for block in trainable:
        block.requires_grad_(True)
    model.head.requires_grad_(True)
    return Frozen(trainable, frozen)


def set_train_mode(model: Classifier, split: Frozen, batchnorm: str) -> None:
    """Train mode for what learns; under `batchnorm: frozen` (the default) frozen blocks stay in eval mode
    entirely and every BatchNorm layer keeps its pre-trained statistics.

    Keeping the statistics of the unfrozen blocks too is the usual advice for fine-tuning (Keras' transfer
    learning guide): batch statistics of a new dataset shift every feature the first step sees, which
    wrecks a warm-started head and makes small batches noisy. Their scale and shift still learn.
    `batchnorm: train` lets every BatchNorm layer, frozen blocks' included, use and track batch statistics.
    """
    model.train()
    if batchnorm == "frozen":
        for block in split.frozen:
            block.eval()
        for module in model.modules():
            if isinstance(module, BATCHNORM):
                module.eval()


def parameter_groups(model: Classifier, split: Frozen, params: FinetuneParams) -> list[dict]:
    """The head at `lr`; each unfrozen block at lr * backbone_lr_mult * layer_decay ** depth (0 = last block).

    Only parameters that require grad are given to the optimizer.
    """
    groups = [{"params": list(model.head.parameters()), "lr": params.lr, "name": "head"}]
    for depth, block in enumerate(reversed(split.trainable)):
        trainable = [p for p in block.parameters() if p.requires_grad]
        if trainable:
            lr = params.lr * params.backbone_lr_mult * params.layer_decay**depth
            groups.append({"params": trainable, "lr": lr, "name": f"block-{len(split.trainable) - 1 - depth}"})
    return groups


def warmup_cosine(warmup_steps: int, total_steps: int):
    """Learning-rate factor per optimizer step: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def init_from_head(layer: nn.Linear, head: TrainedHead) -> None:
    """Copy a trained logistic head into the new layer: scaler and coefficients folded into one affine map.

    logits = ((f - mean) / scale) @ coef.T + b = f @ (coef / scale).T + (b - coef @ (mean / scale)).
    scikit-learn stores a binary problem as one row (the logit of class 1); class 0 gets a zero row.
    """
    if head.kind != "logreg":
        raise FinetuneError(f"init_head needs a logreg head; {head.name} is a {head.kind} head")
    scaler, clf = head.model.named_steps["scale"], head.model.named_steps["clf"]
    coef, intercept = clf.coef_ / scaler.scale_, clf.intercept_ - clf.coef_ @ (scaler.mean_ / scaler.scale_)
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = np.zeros(tuple(layer.weight.shape))
    bias = np.zeros(layer.out_features)
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))


def check_warm_start(
    head: TrainedHead, store_attrs: dict, backbone: str, image_size: int | None, weights: str | None = None
) -> None:
    """A head can seed the new layer only if it saw the features this backbone (with these weights) gives at
    this image size."""
    if head.store_fingerprint != store_attrs.get("fingerprint"):
        raise FinetuneError(
            f"the logreg head was trained on features {head.store_fingerprint}, the store is "
            f"{store_attrs.get('fingerprint')}; rerun train_head"
        )
    size = image_size or store_attrs["preprocessing"]["crop"]
    if store_attrs.get("weights_file") != weights:
        raise FinetuneError(
            f"the logreg head was trained on features of weights {store_attrs.get('weights_file') or 'the defaults'}, "
            f"fine-tuning starts from {weights or 'the defaults'}: rerun extract and train_head"
        )
    seen = (store_attrs.get("backbone"), store_attrs.get("image_size"))
    if seen != (backbone, size):
        raise FinetuneError(
            f"the logreg head was trained on {seen[0]} features at {seen[1]} px, fine-tuning runs {backbone} "
            f"at {size} px: set finetune.image_size to null or init_head to random"
        )


def train_transform(p: Preprocessing, augment: bool):
    """Augmentation on PIL images, ending in the same uint8 tensor as `Preprocessing.to_uint8`."""
    if not augment:
        return p.to_uint8
    return v2.Compose(
        [
            v2.RandomResizedCrop(p.crop, scale=(0.35, 1.0), interpolation=InterpolationMode(p.interpolation)),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
        ]
    )


@dataclass
class FinetuneResult:
    model_path: Path
    epochs_run: int  # epochs trained in total (including those before a resume)
    resumed_from_epoch: int  # 0 when the run started from scratch
    best_epoch: int
    history: list[dict]
    trainable_params: int
    total_params: int
    train_seconds: float
    device: str
    precision: str

    def summary(self) -> dict:
        """What evaluate and the report need to know about the training run."""
        return {
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "resumed_from_epoch": self.resumed_from_epoch,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "train_seconds": round(self.train_seconds, 3),
            "train_accuracy": self.history[self.best_epoch - 1]["train_accuracy"] if self.history else None,
            "device": self.device,
            "precision": self.precision,
        }


def run_key(backbone: Backbone, params: FinetuneParams, manifest: Manifest, head_path: Path | None) -> str:
    """What a checkpoint must match to be resumed: data, backbone, params, warm start, training code."""
    spec = {
        "backbone": backbone.name,
        "weights": backbone.weights_sha256(),
        "params": asdict(params),
        "manifest": manifest_sha256(manifest),
        "head": hashlib.sha256(head_path.read_bytes()).hexdigest() if head_path else None,
        # A change to the training code or to the pixels it is fed must not resume a checkpoint of the old.
        "preprocessing": backbone.preprocessing.to_json(),
        "pixels_version": PIXELS_VERSION,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def finetune(
    manifest_path: Path,
    data_root: Path,
    backbone_name: str,
    params: FinetuneParams,
    out_dir: Path,
    checkpoint_dir: Path,
    head: TrainedHead | None = None,
    head_path: Path | None = None,
    weights: Path | None = None,
) -> FinetuneResult:
    """Fine-tune `backbone_name` on the manifest's train split, early-stopping on val loss.

    A checkpoint (model, optimizer, scheduler, epoch, RNG state, history) is written after every epoch
    under `checkpoint_dir/<run key>/`; a rerun with the same inputs resumes from it. Every source of
    randomness is derived from (seed, epoch), so a resumed run on CPU ends with the same weights as an
    uninterrupted one.
    """
    start = time.perf_counter()
    manifest = read_manifest(manifest_path)
    classes = manifest.classes
    rows = {s: [r for r in manifest.ok_rows() if r.split == s] for s in ("train", "val")}
    if not rows["val"]:
        raise FinetuneError(f"{manifest_path} has no val images for early stopping; set prepare.val_fraction above 0")
    labels = {s: torch.tensor([classes.index(r.class_name) for r in rows[s]]) for s in rows}
    backbone = build_backbone(backbone_name, weights)  # extract.weights: the same network the features came from
    preprocessing = backbone.preprocessing.with_image_size(params.image_size)
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)

    torch.manual_seed(params.seed)
    model = Classifier(backbone.features, backbone.feature_dim, len(classes))
    if params.init_head == "logreg":
        if head is None:
            raise FinetuneError("finetune.init_head is logreg but no trained logreg head was given")
        if head.classes != classes:
            raise FinetuneError(f"the logreg head has classes {head.classes}, the manifest {classes}")
        init_from_head(model.head, head)
    split = freeze(model, backbone.blocks(), params.unfreeze)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(model, split, params), weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(rows["train"]) / params.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(params.warmup_epochs * steps_per_epoch, params.epochs * steps_per_epoch)
    )

    key = run_key(backbone, params, manifest, head_path if params.init_head == "logreg" else None)
    checkpoint = Path(checkpoint_dir) / key / "checkpoint.pt"
    state = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
    best_weights = None
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        best_weights = saved["best_weights"]
        state = {k: saved[k] for k in state}
        log.info("finetune: resuming from %s at epoch %d", checkpoint, state["epoch"] + 1)
    resumed_from = state["epoch"]

    train_seconds = sum(h["seconds"] for h in state["history"])
    loaders = _loaders(data_root, rows, labels, preprocessing, params, device)
    for epoch in range(state["epoch"], params.epochs):
        if params.early_stopping_patience and state["bad_epochs"] >= params.early_stopping_patience:
            break
        epoch_start = time.perf_counter()
        torch.manual_seed(params.seed * 100_003 + epoch)  # dropout and friends: a function of the epoch
        generator = torch.Generator().manual_seed(params.seed * 100_003 + epoch)  # order and augmentation
        train_loss, train_acc = _train_epoch(
            model, split, loaders["train"](generator), optimizer, scheduler, preprocessing, params, device, precision
        )
        val_loss, val_acc = evaluate_loss(model, loaders["val"](None), preprocessing, device, precision)
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        state["history"].append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
            }
        )
        if val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
            best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        _save_checkpoint(checkpoint, model, optimizer, scheduler, best_weights, state)
        log.info(
            "epoch %d: train loss %.4f acc %.4f, val loss %.4f acc %.4f; checkpoint saved",
            *(epoch + 1, train_loss, train_acc, val_loss, val_acc),
        )

    model.load_state_dict(best_weights)
    result = FinetuneResult(
        model_path=Path(out_dir) / "model.safetensors",
        epochs_run=state["epoch"],
        resumed_from_epoch=resumed_from,
        best_epoch=state["best_epoch"],
        history=state["history"],
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        train_seconds=train_seconds,
        device=str(device),
        precision=precision,
    )
    save_finetuned(model, out_dir, backbone, preprocessing, classes, split, params, result.summary())
    log.info("finetune: done in %.1fs", time.perf_counter() - start)
    return result


def _loaders(data_root, rows, labels, preprocessing, params, device):
    """Loader factories: the train loader takes the epoch's generator (shuffling and worker seeds)."""

    def make(split: str, transform, shuffle: bool):
        dataset = LabelledImages(data_root, rows[split], labels[split], transform)

        def loader(generator):
            return DataLoader(
                dataset,
                batch_size=params.batch_size,
                shuffle=shuffle,
                generator=generator,
                num_workers=params.num_workers,
                pin_memory=device.type == "cuda",
            )

        return loader

    return {
        "train": make("train", train_transform(preprocessing, params.augment), True),
        "val": make("val", preprocessing.to_uint8, False),
    }


class LabelledImages(torch.utils.data.Dataset):
    """(uint8 image tensor, label) for manifest rows."""

    def __init__(self, root: Path, rows: list[ManifestRow], labels: torch.Tensor, transform):
        self.images = ImageDataset(root, rows, transform)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i][0], self.labels[i]


def _train_epoch(model, split, loader, optimizer, scheduler, preprocessing, params, device, precision):
    set_train_mode(model, split, params.batchnorm)
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in tqdm(loader, desc="finetune", unit="batch", leave=False):
        images, targets = _to_device(images, targets, preprocessing, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images)
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(targets)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(targets)
    return total_loss / seen, correct / seen


def _to_device(images, targets, preprocessing, device):
    images = preprocessing.normalize(images.to(device, non_blocking=True))
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


@torch.inference_mode()
def predict_proba(model: nn.Module, loader, preprocessing: Preprocessing, device, precision: str) -> np.ndarray:
    """Softmax probabilities of every image the loader yields, in order."""
    model.eval()
    out = []
    for images, _ in loader:
        images, _ = _to_device(images, torch.zeros(0), preprocessing, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out.append(model(images).double().softmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@torch.inference_mode()
def evaluate_loss(model, loader, preprocessing, device, precision) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a loader of `LabelledImages`."""
    targets = loader.dataset.labels
    proba = predict_proba(model, loader, preprocessing, device, precision)
    p_true = np.clip(proba[np.arange(len(targets)), targets.numpy()], 1e-12, 1.0)
    return float(-np.log(p_true).mean()), float((proba.argmax(1) == targets.numpy()).mean())


def _save_checkpoint(path: Path, model, optimizer, scheduler, best_weights, state: dict) -> None:
    """Atomically: a kill during the save leaves the previous epoch's checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "best_weights": best_weights,
            **state,
        },
        tmp,
    )
    os.replace(tmp, path)


def save_finetuned(model, out_dir, backbone, preprocessing, classes, split: Frozen, params, training: dict) -> Path:
    """safetensors weights plus a JSON config (classes, backbone, preprocessing, unfrozen blocks).

    Both are written into a temporary folder that then replaces `out_dir`, so weights and config always
    belong together; a kill leaves the old pair or nothing.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {
        "backbone": backbone.name,
        "classes": classes,
        "feature_dim": backbone.feature_dim,
        "preprocessing": json.loads(preprocessing.to_json()),
        "unfrozen_blocks": len(split.trainable),
        "total_blocks": len(split.trainable) + len(split.frozen),
        "params": asdict(params),
        "training": training,
    }
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir / "model.safetensors"


def load_finetuned(model_dir: Path) -> tuple[Classifier, dict, Preprocessing]:
    """The fine-tuned classifier in eval mode, its config, and its preprocessing."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FinetuneError(f"no fine-tuned model in {model_dir} (config.json missing); run the finetune stage")
    config = json.loads(config_path.read_text())
    backbone = build_backbone(config["backbone"])
    model = Classifier(backbone.features, config["feature_dim"], len(config["classes"]))
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return model.eval(), config, Preprocessing.from_dict(config["preprocessing"])
