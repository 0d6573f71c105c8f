"""The fine-tuning checkpoint: where a run stands after an epoch, saved sealed (pipeline.core.integrity) so that a
damaged file is set aside and never resumed."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from pipeline.core.integrity import SEAL_LINE, DamagedFile, check_seal, seal, set_aside
from pipeline.core.io import atomic_path


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
