"""Weights files: loaded as plain tensors (nothing unpickled), checked against the model, found in the caches."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.core.errors import PipelineError


class BackboneError(PipelineError):
    """A backbone cannot be built: unknown name, or weights that are not available."""


# What reading a damaged or foreign weights file raised in practice: torch.load's zip reader (RuntimeError), its
# weights-only unpickler (UnpicklingError, also for a pickle that would run code: none runs; EOFError, KeyError,
# IndexError, UnicodeDecodeError on garbled bytes), and the safetensors header parser.
WEIGHTS_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError)
WEIGHTS_FIX = (
    "set the backbone's weights (extract.backbones.<label>.weights) to a safetensors file or torch state dict of "
    "this architecture"
)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from safetensors or a torch file, never unpickling arbitrary objects; anything else is a
    one-line `BackboneError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)
    except (*WEIGHTS_ERRORS, SafetensorError) as err:
        raise BackboneError(
            f"{path}: not a weights file that loads as plain tensors ({_summary(err)}); {WEIGHTS_FIX}"
        ) from err
    # Some checkpoints wrap the state dict: {"state_dict": {...}} or {"model": {...}}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: holds no state dict (names mapped to tensors); {WEIGHTS_FIX}")
    return state


def load_weights_into(model: nn.Module, path: Path, name: str) -> None:
    """Load a weights file into `model`, refusing in one line one that does not fit it tensor for tensor."""
    state, expected = load_state_dict(path), model.state_dict()
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = [f"{len(missing)} of its {len(expected)} tensors missing (first {missing[0]})"] if missing else []
    problems += [f"{len(unknown)} unknown (first {unknown[0]})"] if unknown else []
    if reshaped:
        k = reshaped[0]
        shapes = f"{tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in {name}"
        problems.append(f"{len(reshaped)} of another shape (first {k}: {shapes})")
    if problems:
        raise BackboneError(f"{path}: not weights of {name}: {'; '.join(problems)}; {WEIGHTS_FIX}")
    model.load_state_dict(state)


def timm_model_from_file(arch: str, path: Path) -> nn.Module:
    """timm's model `arch` with the weights of a local file, through timm's own loader: it adapts checkpoints of
    some models (filter functions). timm reads torch files with weights_only=True: a pickle that would run code is
    refused."""
    import timm
    from safetensors import SafetensorError

    if not Path(path).is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except (*WEIGHTS_ERRORS, SafetensorError) as err:
        raise BackboneError(f"{path}: timm cannot load it into {arch} ({_summary(err)}); {WEIGHTS_FIX}") from err


def _summary(err: BaseException) -> str:
    """An error in one line: torch's messages run over many (a first line ending in ':' gets the next one), and
    its advice for a refused pickle (to load it unsafely) is not ours to give."""
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return "it holds Python objects besides tensors, which are not unpickled: no code from it ran"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(err).__name__}: {text.split('. ')[0][:200]}"


def hub_checkpoint(url: str) -> Path:
    """Where torch hub keeps the checkpoint downloaded from `url` (torchvision's weights)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def hugging_face_cached(hub_id: str | None) -> str | None:
    """The path of a Hugging Face repository's weights file in the local cache (timm's weights), or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(hit, str):
            return hit
    return None


def require_download(name: str, url: str, target: Path | None, allow_download: bool) -> None:
    """Fail at once, in one line, when weights are neither cached nor downloadable."""
    where = f" to {target}" if target else ""
    fix = f"download {url} on a machine with network{where}, or set extract.backbones.<label>.weights to a local file"
    if not allow_download:
        raise BackboneError(f"weights for {name} are not cached and downloads are off: {fix}")
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise BackboneError(f"weights for {name} are not cached and {host} is unreachable ({err}): {fix}") from err
