"""The fine-tuning checkpoint: where a run stands after an epoch, saved sealed (pipeline.core.integrity) so that a
damaged file is set aside, under a run key that says which checkpoint a run may resume."""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from pipeline.core.config import FinetuneParams
from pipeline.core.integrity import SEAL_LINE, DamagedFile, check_seal, seal, set_aside
from pipeline.core.io import atomic_path
from pipeline.data.manifest import Manifest, manifest_sha256
from pipeline.data.preprocessing import PIXELS_VERSION
from pipeline.features.backbones import Backbone


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


def save_checkpoint(path: Path, model_state: dict, state: TrainingState) -> None:
    """`model_state` (the model's, optimizer's and scheduler's state dicts, the RNG state) and `state`, atomically
    and sealed: a kill during the save leaves the previous epoch's checkpoint intact."""
    buffer = io.BytesIO()
    # asdict would deep-copy the weights
    torch.save({**model_state, **{f.name: getattr(state, f.name) for f in fields(state)}}, buffer)
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            f.write(bytes(SEAL_LINE))  # the seal's place
            f.write(buffer.getbuffer())
        seal(tmp)


def checkpoint_payload(path: Path) -> bytes | None:
    """What torch.save wrote, once the seal matches; None for a damaged or truncated file, set aside as
    `<name>.corrupt` with a warning (the run then starts again from epoch 1)."""
    try:
        check_seal(path, kind="fine-tuning checkpoint")
    except DamagedFile as err:
        set_aside(path, "finetune: checkpoint", err, "training starts again from epoch 1")
        return None
    return Path(path).read_bytes()[SEAL_LINE:]


def load_checkpoint(payload: bytes) -> dict:
    """The dict `save_checkpoint` saved, from the bytes `checkpoint_payload` checked (tensors only: no pickle
    code runs)."""
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def read_checkpoint(path: Path) -> dict | None:
    """What `save_checkpoint` saved; None when the file is damaged (then set aside by `checkpoint_payload`)."""
    payload = checkpoint_payload(path)
    return None if payload is None else load_checkpoint(payload)


# The code a fine-tuning run's weights depend on: the packages its stage runs (dvc.yaml's deps for finetune). A
# change to any of it must not resume a checkpoint written by the old code.
TRAINING_PACKAGES = ("core", "data", "features", "finetuning")


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
