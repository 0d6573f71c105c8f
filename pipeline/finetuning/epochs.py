"""The epochs of a fine-tuning run: the data each rank trains on, a training pass, a validation pass, the epoch's
record and the checkpoint after it, early stopping."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from pipeline.core.config import FinetuneParams
from pipeline.core.device import Runtime
from pipeline.data.loading import EpochShard, Images, image_batches, predict_proba, sharded_batches
from pipeline.data.manifest import Manifest, ManifestRow
from pipeline.data.preprocessing import Preprocessing
from pipeline.finetuning import distributed
from pipeline.finetuning.checkpoint import TrainingState, save_checkpoint
from pipeline.finetuning.distributed import SINGLE, Ranks
from pipeline.finetuning.freezing import Frozen, set_train_mode
from pipeline.finetuning.model import Classifier


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


log = logging.getLogger(__name__)


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
