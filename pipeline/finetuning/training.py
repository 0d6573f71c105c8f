"""Fine-tuning: a new output layer on a pre-trained backbone whose last blocks are unfrozen and retrained."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from pipeline.core.config import FinetuneParams, rank_batch_size
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_path
from pipeline.data.loading import EpochShard, Images, Runtime, image_batches, predict_proba, sharded_batches
from pipeline.data.manifest import Manifest, ManifestRow, manifest_sha256, read_manifest
from pipeline.features.backbones import PIXELS_VERSION, Backbone, Preprocessing, build_backbone, input_size, tiny_images
from pipeline.finetuning import distributed
from pipeline.finetuning.distributed import SINGLE, Ranks
from pipeline.finetuning.model import Classifier, save_finetuned
from pipeline.heads.trained import TrainedHead

log = logging.getLogger(__name__)

# The code a fine-tuning run's weights depend on: the packages its stage runs (dvc.yaml's deps for finetune). A
# change to any of it must not resume a checkpoint written by the old code.
TRAINING_PACKAGES = ("core", "data", "features", "finetuning", "heads")

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FinetuneError(PipelineError):
    """Fine-tuning cannot start: e.g. a warm-start head trained on other classes or another backbone."""


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
    head: TrainedHead, classes: list[str], manifest: str, backbone: str, crop: int, weights: str | Path | None
) -> None:
    """A head can seed the new layer only if it saw these classes, in the split of this manifest (`manifest`,
    its hash: a head of another split may have trained on this one's test rows), and the features this backbone
    (with these weights) gives at this image size."""
    if head.kind != "logreg":
        raise FinetuneError(f"init_head needs a logreg head; {head.name} is a {head.kind} head")
    if head.classes != classes:
        raise FinetuneError(f"the logreg head has classes {head.classes}, the manifest {classes}; rerun the head stage")
    if head.manifest_sha256 != manifest:
        raise FinetuneError(
            f"the logreg head was trained on the split of manifest {str(head.manifest_sha256)[:16]}, fine-tuning "
            f"reads manifest {manifest[:16]} (prepare ran again since): rerun the head stage"
        )
    seen = head.store_attrs
    if _as_path(seen.get("weights_file")) != _as_path(weights):  # `./w.safetensors` is `w.safetensors`
        raise FinetuneError(
            f"the logreg head was trained on features of weights {seen.get('weights_file') or 'the defaults'}, "
            f"fine-tuning starts from {weights or 'the defaults'}: rerun extract and the head stage"
        )
    if (seen.get("backbone"), seen.get("image_size")) != (backbone, crop):
        raise FinetuneError(
            f"the logreg head was trained on {seen.get('backbone')} features at {seen.get('image_size')} px, "
            f"fine-tuning runs {backbone} at {crop} px: set finetune.image_size to null or init_head to random"
        )


def _as_path(value: str | Path | None) -> Path | None:
    return Path(value) if value else None


def initial_layer(
    backbone: Backbone,
    manifest: Manifest,
    params: FinetuneParams,
    head: TrainedHead | None = None,
    weights: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """The new output layer's starting weights: seeded random ones, or the trained logistic head folded in
    (`params.init_head: logreg`, the linear probe then fine-tune recipe), after checking that the head saw
    the manifest's classes and split, and the features of this backbone, weights (`weights`, extract's) and
    image size."""
    torch.manual_seed(params.seed)
    layer = nn.Linear(backbone.feature_dim, len(manifest.classes))
    if params.init_head == "logreg":
        if head is None:
            raise FinetuneError("finetune.init_head is logreg but no trained logreg head was given")
        crop = with_input_size(params, backbone, manifest).image_size
        check_warm_start(head, manifest.classes, manifest_sha256(manifest), backbone.name, crop, weights)
        init_from_head(layer, head)
    return {name: tensor.detach().clone() for name, tensor in layer.state_dict().items()}


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
    processes: int = 1  # torchrun's ranks (world size); 1 without torchrun
    writes: bool = True  # this rank writes the outputs (one rank of several does)

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
            "processes": self.processes,
        }


@dataclass
class TrainingState:
    """Where a run stands after an epoch: what a checkpoint holds besides the model, optimizer and scheduler."""

    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the val loss last improved
    history: list[dict] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None

    def stopped_early(self, patience: int) -> bool:
        return bool(patience) and self.bad_epochs >= patience


@dataclass
class Training:
    """Everything one fine-tuning run works with, built once."""

    model: Classifier
    split: Frozen
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    runtime: Runtime
    preprocessing: Preprocessing
    params: FinetuneParams
    ranks: Ranks = SINGLE


@dataclass(frozen=True)
class Splits:
    """The manifest's usable train and val rows, their labels, and the class names."""

    manifest: Manifest
    classes: list[str]
    rows: dict[str, list[ManifestRow]]
    labels: dict[str, torch.Tensor]


LIBRARY = Path(__file__).resolve().parents[1]  # the `pipeline` folder


def code_sha256(packages: tuple[str, ...] = TRAINING_PACKAGES) -> str:
    """The sha256 of every module of `packages` (folders of `pipeline`), in path order."""
    root = LIBRARY
    digest = hashlib.sha256()
    for path in sorted(p for package in packages for p in (root / package).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# How the ranks are started (finetune.engine, finetune.torchrun's nodes and rendezvous) is left out of the run key:
# the same processes, however launched, compute the same thing. What they compute depends on how many there are:
# each batch is split between them (BatchNorm statistics per rank under `batchnorm: train`, per-rank augmentation
# draws, the order of the gradient sums), so the world size is in the key: a checkpoint of 2 ranks is not resumed
# by 1 or 4. `engine: torchrun` with one process runs no process group: it is the local run, with its key.
LAUNCH_PARAMS = ("engine", "torchrun")


def run_key(
    backbone: Backbone, params: FinetuneParams, manifest: Manifest, initial_layer: nn.Linear, world: int = 1
) -> str:
    """What a checkpoint must match to be resumed: data, backbone, params, the new layer's starting weights (the
    warm start, or the seeded random ones), the training code and pixels, and the number of ranks (`world`)."""
    layer = hashlib.sha256()
    for tensor in (initial_layer.weight, initial_layer.bias):
        layer.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    spec = {
        "backbone": backbone.name,
        "weights": backbone.weights_sha256(),
        "params": {k: v for k, v in asdict(params).items() if k not in LAUNCH_PARAMS},
        "processes": world,
        "manifest": manifest_sha256(manifest),
        "initial_layer": layer.hexdigest(),
        # A change to the training code or to the pixels it is fed must not resume a checkpoint of the old.
        "preprocessing": backbone.preprocessing.to_json(),
        "pixels_version": PIXELS_VERSION,
        "code": code_sha256(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def finetune(
    manifest_path: Path,
    data_root: Path,
    backbone_name: str,
    params: FinetuneParams,
    out_dir: Path,
    checkpoint_dir: Path,
    *,
    initial: dict[str, torch.Tensor] | None = None,
    weights: Path | None = None,
    ranks: Ranks = SINGLE,
) -> FinetuneResult:
    """Fine-tune `backbone_name` (with `weights`, extract's, when given) on the manifest's train split,
    early-stopping on val loss. The new layer starts at `initial` (what the warm_start stage wrote with
    `initial_layer`); by default at seeded random weights.

    A checkpoint (model, optimizer, scheduler, RNG state, training state) is written after every epoch under
    `checkpoint_dir/<run key>/`; a rerun with the same inputs resumes from it. Every source of randomness is
    derived from (seed, epoch), so a resumed run on CPU ends with the same weights as an uninterrupted one.

    Under torchrun every rank calls this with its `ranks` (pipeline.finetuning.distributed.ranks_from_env): the ranks
    train one model with DistributedDataParallel on shares of the same global batches (`params.batch_size` stays the
    global batch), and one of them (`ranks.writer`) reads and writes the checkpoint and the outputs.
    """
    start = time.perf_counter()
    if ranks.world > 1:
        distributed.die_with_launcher()  # first: a launcher killed while the model is built takes this rank along
    rank_batch_size(params.batch_size, ranks.world)  # an uneven split is refused before anything is built
    data = read_splits(manifest_path)
    backbone = build_backbone(backbone_name, weights)
    params = with_input_size(params, backbone, data.manifest)
    if initial is None:
        initial = initial_layer(backbone, data.manifest, params)  # init_head: logreg needs the head: refused here
    training = build_training(backbone, data, params, initial, ranks)
    key = run_key(backbone, params, data.manifest, training.model.head, ranks.world)
    checkpoint = Path(checkpoint_dir) / key / "checkpoint.pt"
    with distributed.process_group(ranks, training.runtime.device) as joined:
        training.ranks = joined  # with its writer elected
        state = resume(checkpoint, training)
        resumed_from = state.epoch
        fit(training, data, Path(data_root), state, checkpoint)
    if state.best_weights is None:  # every val loss was NaN: nothing to keep
        raise FinetuneError(f"the val loss was not a number in any of {state.epoch} epochs; lower finetune.lr")
    training.model.load_state_dict(state.best_weights)
    result = training_result(training, state, resumed_from, Path(out_dir) / "model.safetensors")
    if result.writes:
        save_finetuned(training.model, out_dir, saved_config(backbone, training, data.classes, result))
    log.info("finetune: done in %.1fs", time.perf_counter() - start)
    return result


def training_result(training: Training, state: TrainingState, resumed_from: int, model_path: Path) -> FinetuneResult:
    """What the stage reports and config.json keeps of the run (of several ranks, the device kind: each has its
    own GPU)."""
    model, ranks = training.model, training.ranks
    return FinetuneResult(
        model_path=model_path,
        epochs_run=state.epoch,
        resumed_from_epoch=resumed_from,
        best_epoch=state.best_epoch,
        history=state.history,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        train_seconds=sum(h["seconds"] for h in state.history),
        device=str(training.runtime.device) if ranks.world == 1 else training.runtime.device.type,
        precision=training.runtime.precision,
        processes=ranks.world,
        writes=ranks.writes,
    )


def with_input_size(params: FinetuneParams, backbone: Backbone, manifest: Manifest) -> FinetuneParams:
    """`params` with image_size in pixels and augment true or false: auto and null resolved on these images as
    extract resolves them (pipeline.features.backbones.input_size), so fine-tuning sees the inputs the frozen features
    came from; augment auto is off for tiny images (pipeline.features.backbones.tiny_images)."""
    median_side = manifest.median_short_side()
    size, why = input_size(params.image_size, backbone.preprocessing.crop, median_side)
    augment = not tiny_images(median_side) if params.augment == "auto" else params.augment
    if (size, augment) != (params.image_size, params.augment):
        log.info("finetune: %s at %d px (%s), augmentation %s", backbone.name, size, why, "on" if augment else "off")
    return replace(params, image_size=size, augment=augment)


def read_splits(manifest_path: Path) -> Splits:
    manifest = read_manifest(manifest_path)
    classes = manifest.classes
    rows = {s: [r for r in manifest.ok_rows() if r.split == s] for s in ("train", "val")}
    if not rows["val"]:
        raise FinetuneError(f"{manifest_path} has no val images for early stopping; set prepare.val_fraction above 0")
    labels = {s: torch.tensor([classes.index(r.class_name) for r in rows[s]]) for s in rows}
    return Splits(manifest, classes, rows, labels)


def build_training(
    backbone: Backbone, data: Splits, params: FinetuneParams, initial: dict, ranks: Ranks = SINGLE
) -> Training:
    """The model with its new layer at `initial`, its frozen blocks, the optimizer and the schedule, on this
    rank's device."""
    preprocessing = backbone.preprocessing.with_image_size(params.image_size)
    model = Classifier(backbone.features, backbone.feature_dim, len(data.classes))
    try:
        model.head.load_state_dict(initial)
    except RuntimeError as err:  # a layer written for other classes or another backbone
        raise FinetuneError(
            f"the starting layer does not fit {backbone.name} and {len(data.classes)} classes ({err}); rerun warm_start"
        ) from err
    split = freeze(model, backbone.blocks(), params.unfreeze)
    runtime = Runtime.resolve(params.device, params.precision, option="finetune.device")
    runtime = replace(runtime, device=distributed.rank_device(runtime.device, ranks))
    runtime.place(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, split, params), weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(data.rows["train"]) / params.batch_size)  # each rank's too (see EpochShard)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(params.warmup_epochs * steps_per_epoch, params.epochs * steps_per_epoch)
    )
    return Training(model, split, optimizer, scheduler, runtime, preprocessing, params, ranks)


def resume(checkpoint: Path, training: Training) -> TrainingState:
    """The state saved after the last completed epoch, loaded into the model and optimizer; a fresh one if there
    is none, or if it is damaged (set aside by `checkpoint_payload`): training then starts from scratch.

    Of several ranks, the writer reads the file and sends its bytes to the others: the other machines need no
    shared disk, and every rank starts from the same state."""
    ranks = training.ranks
    payload = checkpoint_payload(checkpoint) if ranks.writes and checkpoint.is_file() else None
    if ranks.world > 1:
        payload = distributed.broadcast_bytes(payload, ranks.writer, training.runtime.device)
    saved = None if payload is None else load_checkpoint(payload)
    if saved is None:
        return TrainingState()
    training.model.load_state_dict(saved["model"])
    training.optimizer.load_state_dict(saved["optimizer"])
    training.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state = TrainingState(**{f.name: saved[f.name] for f in fields(TrainingState)})
    if ranks.writes:
        log.info("finetune: resuming from %s at epoch %d", checkpoint, state.epoch + 1)
    return state


def fit(training: Training, data: Splits, data_root: Path, state: TrainingState, checkpoint: Path) -> None:
    """Train epoch after epoch until `params.epochs` or early stopping; a checkpoint after each.

    Of several ranks, each trains on its `EpochShard` of every global batch (DistributedDataParallel averages the
    gradients) and scores a strided share of the val rows (rank, rank + ranks, ...: none dropped or repeated) on
    the bare model, so evaluation runs no collective. The sums are added across ranks: every rank records the
    same epoch and stops at the same one. The writer saves the checkpoint.
    """
    params, runtime, p, ranks = training.params, training.runtime, training.preprocessing, training.ranks
    per_rank = params.batch_size // ranks.world
    train = Images.of_rows(data_root, data.rows["train"], train_transform(p, params.augment))
    val = Images.of_rows(data_root, data.rows["val"][ranks.rank :: ranks.world], p.to_uint8)
    shard = EpochShard(train, num_replicas=ranks.world, rank=ranks.rank, seed=params.seed * 100_003)
    network = distributed.data_parallel(training.model, ranks, runtime.device)
    for epoch in range(state.epoch, params.epochs):
        if state.stopped_early(params.early_stopping_patience):
            break
        epoch_start = time.perf_counter()
        shard.set_epoch(epoch)  # the order: the same permutation of (seed, epoch) on every rank
        # Dropout and augmentation draw from the epoch and the rank (one process: seed * 100_003 + epoch, as ever).
        seed = (params.seed * 100_003 + epoch) * ranks.world + ranks.rank
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)  # the workers' seeds, and so their augmentation
        batches = sharded_batches(train, per_rank, params.num_workers, runtime.device, shard, generator)
        sums = train_epoch(training, network, batches, data.labels["train"])
        if ranks.world > 1:
            distributed.broadcast_buffers(training.model, ranks.writer)  # batchnorm: train moved each rank's own
        val_batches = image_batches(val, per_rank, params.num_workers, runtime.device)
        sums += evaluate_sums(training, val_batches, data.labels["val"][ranks.rank :: ranks.world])
        record = epoch_record(training, epoch, sums, time.perf_counter() - epoch_start)
        end_epoch(training, state, record)
        if ranks.writes:
            save_checkpoint(checkpoint, training, state)
        log.info(
            "epoch %d: train loss %.4f acc %.4f, val loss %.4f acc %.4f%s",
            *(epoch + 1, *(record[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"))),
            "; checkpoint saved" if ranks.writes else "",
        )


def epoch_record(training: Training, epoch: int, sums: tuple, seconds: float) -> dict:
    """The epoch's means from this rank's sums (train loss, hits, images; val the same), added across the ranks."""
    if training.ranks.world > 1:
        sums = distributed.all_reduce_sums(sums, training.runtime.device)
    loss, hits, seen, val_loss, val_hits, val_seen = sums
    return {
        "epoch": epoch + 1,
        "train_loss": loss / seen,
        "train_accuracy": hits / seen,
        "val_loss": val_loss / val_seen,
        "val_accuracy": val_hits / val_seen,
        "lr": training.optimizer.param_groups[0]["lr"],
        "seconds": seconds,
    }


def end_epoch(training: Training, state: TrainingState, record: dict) -> None:
    """Record the epoch; keep the weights with the lowest val loss so far."""
    state.history.append(record)
    if record["val_loss"] < state.best_val_loss:
        state.best_val_loss, state.best_epoch, state.bad_epochs = record["val_loss"], record["epoch"], 0
        state.best_weights = {k: v.detach().cpu().clone() for k, v in training.model.state_dict().items()}
    else:
        state.bad_epochs += 1
    state.epoch = record["epoch"]


def train_epoch(training: Training, network: nn.Module, batches, labels: torch.Tensor) -> tuple[float, int, int]:
    """One pass over this rank's training batches through `network` (the model, or DDP around it); the summed
    loss, the correct predictions and the images seen."""
    model, runtime, ranks = training.model, training.runtime, training.ranks
    set_train_mode(model, training.split, training.params.batchnorm)
    per_rank = training.params.batch_size // ranks.world
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc="finetune", unit="batch", leave=False, disable=ranks.local_rank != 0)
    for step, batch in enumerate(bar):
        images = runtime.inputs(batch.images, training.preprocessing.normalize)
        targets = labels[batch.index].to(runtime.device, non_blocking=True)
        with runtime.autocast():
            logits = network(images)
            loss, summed, hits, count = batch_loss(logits, targets, step * per_rank, per_rank, ranks, len(labels))
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.optimizer.step()
        training.scheduler.step()
        total_loss += summed
        correct += hits
        seen += count
    return total_loss, correct, seen


def batch_loss(
    logits: torch.Tensor, targets: torch.Tensor, first: int, batch_size: int, ranks: Ranks, n: int
) -> tuple[torch.Tensor, float, int, int]:
    """The loss to backpropagate, and the batch's summed loss, correct predictions and images for the metrics
    (`batch_size`: each rank's full batch; `n`: the images of the epoch).

    One process: the batch mean. Several: DDP averages the ranks' gradients, which is the global batch's mean only
    if each rank's loss is its summed loss times ranks / (images of the global batch): exact for an uneven last
    batch too, and for EpochShard's padding (positions past `n`; this batch holds positions `first`, `first` + 1,
    ... of this rank's share, which are rank + ranks * those of the epoch's permutation): weighted 0 and not
    counted (the images still pass through the network: under `batchnorm: train` they enter their rank's batch
    statistics).
    """
    if ranks.world == 1:
        loss = nn.functional.cross_entropy(logits.float(), targets)
        return loss, loss.item() * len(targets), int((logits.argmax(1) == targets).sum()), len(targets)
    real = (first + torch.arange(len(targets), device=targets.device)) * ranks.world + ranks.rank < n
    step_images = min(n - first * ranks.world, batch_size * ranks.world)
    losses = nn.functional.cross_entropy(logits.float(), targets, reduction="none")[real]
    summed = losses.sum()
    hits = int((logits.argmax(1) == targets)[real].sum())
    return summed * (ranks.world / step_images), summed.item(), hits, int(real.sum())


def evaluate_sums(training: Training, batches, labels: torch.Tensor) -> tuple[float, int, int]:
    """The summed cross-entropy, the correct predictions and the images scored: what ranks add up."""
    proba = predict_proba(training.model, batches, training.runtime, training.preprocessing.normalize)
    targets = labels.numpy()
    if not len(targets):  # more ranks than val rows
        return 0.0, 0, 0
    p_true = np.clip(proba[np.arange(len(targets)), targets], 1e-12, 1.0)
    return float((-np.log(p_true)).sum()), int((proba.argmax(1) == targets).sum()), len(targets)


# A checkpoint file is this header, the sha256 of the rest and a newline, then what torch.save wrote. The digest is
# checked before torch.load reads a byte: torch's zip reader checks no CRC, so zeroed bytes inside a tensor load
# as zeros, and damaged zip or pickle structure fails in many ways. Written by hand: torch has no such check.
CHECKPOINT_HEADER = b"transfer-pipeline checkpoint sha256 "


def save_checkpoint(path: Path, training: Training, state: TrainingState) -> None:
    """Atomically, with its digest inside: a kill during the save leaves the previous epoch's checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(
        {
            "model": training.model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            **{f.name: getattr(state, f.name) for f in fields(state)},  # asdict would deep-copy the weights
        },
        buffer,
    )
    payload = buffer.getbuffer()
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(CHECKPOINT_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)


def read_checkpoint(path: Path) -> dict | None:
    """What `save_checkpoint` saved; None when the file is damaged or truncated (or of another format): it is
    then renamed aside to `<name>.corrupt`, with a warning naming it."""
    payload = checkpoint_payload(path)
    return None if payload is None else load_checkpoint(payload)


def load_checkpoint(payload: bytes) -> dict:
    """The dict `save_checkpoint` saved, from the bytes `checkpoint_payload` checked."""
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def checkpoint_payload(path: Path) -> bytes | None:
    """What torch.save wrote, once its sha256 matches; None for a damaged or truncated file (set aside as
    `<name>.corrupt`, with a warning)."""
    data = memoryview(Path(path).read_bytes())
    end = len(CHECKPOINT_HEADER) + 65
    payload = data[end:]
    if data[:end] != CHECKPOINT_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n":
        aside = Path(path).with_name(Path(path).name + ".corrupt")
        os.replace(path, aside)
        log.warning(
            "finetune: checkpoint %s is damaged or truncated (its sha256 does not match); moved aside to %s, "
            "training starts again from epoch 1",
            *(path, aside.name),
        )
        return None
    return bytes(payload)


def saved_config(backbone: Backbone, training: Training, classes: list[str], result: FinetuneResult) -> dict:
    """What travels with the weights: enough to rebuild, preprocess and describe the model."""
    return {
        "backbone": backbone.name,
        "classes": classes,
        "feature_dim": backbone.feature_dim,
        "preprocessing": json.loads(training.preprocessing.to_json()),
        "unfrozen_blocks": len(training.split.trainable),
        "total_blocks": len(training.split.trainable) + len(training.split.frozen),
        "params": {
            k: v for k, v in asdict(training.params).items() if k not in LAUNCH_PARAMS
        },  # the run's, not its launch's
        "training": result.summary(),
    }
