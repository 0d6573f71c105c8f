"""Fine-tuning: a new output layer on a pre-trained backbone whose last blocks are unfrozen and retrained."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from pipeline.core.config import FinetuneParams, rank_batch_size
from pipeline.core.device import Runtime
from pipeline.data.loading import EpochShard, Images, image_batches, predict_proba, sharded_batches
from pipeline.data.manifest import Manifest, ManifestRow, manifest_sha256, read_manifest
from pipeline.data.preprocessing import PIXELS_VERSION, Preprocessing, input_size, tiny_images
from pipeline.features.backbones import Backbone, build_backbone
from pipeline.finetuning import distributed
from pipeline.finetuning.checkpoint import TrainingState, checkpoint_payload, load_checkpoint, save_checkpoint
from pipeline.finetuning.distributed import SINGLE, Ranks
from pipeline.finetuning.freezing import Frozen, freeze, set_train_mode
from pipeline.finetuning.model import Classifier, FinetuneError, new_layer, save_finetuned
from pipeline.finetuning.schedule import parameter_groups, warmup_cosine

log = logging.getLogger(__name__)

# The code a fine-tuning run's weights depend on: the packages its stage runs (dvc.yaml's deps for finetune). A
# change to any of it must not resume a checkpoint written by the old code.
TRAINING_PACKAGES = ("core", "data", "features", "finetuning")


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
    if initial is None:  # the warm_start stage's layer: init_head logreg needs it
        if params.init_head == "logreg":
            raise FinetuneError("finetune.init_head is logreg but no trained logreg head was given (warm_start)")
        initial = new_layer(backbone.feature_dim, len(data.classes), params.seed).state_dict()
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
    extract resolves them (pipeline.data.preprocessing.input_size), so fine-tuning sees the inputs the frozen features
    came from; augment auto is off for tiny images (pipeline.data.preprocessing.tiny_images)."""
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
    runtime = runtime.for_rank(ranks.local_rank, ranks.world, option="finetune.device")
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


def training_state(training: Training) -> dict:
    """What a checkpoint keeps of the model and its training besides `TrainingState`."""
    return {
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }


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
            save_checkpoint(checkpoint, training_state(training), state)
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


def saved_config(backbone: Backbone, training: Training, classes: list[str], result: FinetuneResult) -> dict:
    """What travels with the weights: enough to rebuild, preprocess and describe the model."""
    return {
        "backbone": backbone.name,
        "classes": classes,
        "feature_dim": backbone.feature_dim,
        "preprocessing": training.preprocessing.to_dict(),
        "unfrozen_blocks": len(training.split.trainable),
        "total_blocks": len(training.split.trainable) + len(training.split.frozen),
        "params": {
            k: v for k, v in asdict(training.params).items() if k not in LAUNCH_PARAMS
        },  # the run's, not its launch's
        "training": result.summary(),
    }
