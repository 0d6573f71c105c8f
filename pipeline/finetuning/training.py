"""Fine-tuning: a new output layer on a pre-trained backbone whose last blocks are unfrozen and retrained."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from pipeline.core.config import FinetuneParams, rank_batch_size
from pipeline.core.device import Runtime
from pipeline.data.manifest import Manifest, read_manifest
from pipeline.data.preprocessing import input_size, tiny_images
from pipeline.features.backbones import Backbone, build_backbone
from pipeline.finetuning import distributed
from pipeline.finetuning.checkpoint import LAUNCH_PARAMS, TrainingState, checkpoint_payload, load_checkpoint, run_key
from pipeline.finetuning.distributed import SINGLE, Ranks
from pipeline.finetuning.epochs import Splits, Training, fit
from pipeline.finetuning.freezing import freeze
from pipeline.finetuning.model import Classifier, FinetuneError, new_layer, save_finetuned
from pipeline.finetuning.schedule import parameter_groups, warmup_cosine

log = logging.getLogger(__name__)


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
