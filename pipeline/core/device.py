"""Where networks run: the device (`auto`: CUDA, then MPS, then CPU), the precision, the memory layout, and a
device per torchrun rank. The one place that decides them, for extraction, its Ray actors, fine-tuning and predict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pipeline.core.errors import ConfigError, PipelineError


class DeviceError(PipelineError):
    """The device asked for is not on this machine."""


def resolve_device(requested: str, option: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then CPU. `option` names who asked (`extract.device`, `--device`)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if requested in available and not available[requested]():
        raise DeviceError(f"{option} is {requested} but no {requested.upper()} device is available; use auto or cpu")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` means bf16 autocast on CUDA and exact fp32 elsewhere."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return requested


@dataclass(frozen=True)
class Runtime:
    """A resolved device and precision, and the memory layout networks and their inputs use there."""

    device: torch.device
    precision: str  # fp32, or bf16 autocast
    channels_last: bool

    @classmethod
    def resolve(cls, device: str, precision: str, *, option: str, channels_last: bool | None = None) -> Runtime:
        """`channels_last` defaults to CUDA only, where its kernels are the fast ones."""
        dev = resolve_device(device, option)
        layout = dev.type == "cuda" if channels_last is None else channels_last
        return cls(dev, resolve_precision(precision, dev), layout)

    @classmethod
    def on(cls, device: str | torch.device, precision: str, *, channels_last: bool = True) -> Runtime:
        """A device chosen elsewhere (a Ray actor's, which the cluster decides), with its precision resolved."""
        dev = torch.device(device)
        return cls(dev, resolve_precision(precision, dev), channels_last)

    def for_rank(self, local_rank: int, world: int, option: str) -> Runtime:
        """This runtime for one of `world` torchrun ranks: one GPU per rank on CUDA (cuda:LOCAL_RANK, made the
        current device); the CPU is shared. `option` names the setting that chose the device."""
        if world == 1 or self.device.type == "cpu":
            return self
        if self.device.type != "cuda":
            raise ConfigError(f"{option} {self.device.type} cannot run several processes (torchrun); use cpu or cuda")
        torch.cuda.set_device(local_rank)
        return replace(self, device=torch.device("cuda", local_rank))

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def place(self, network: torch.nn.Module) -> torch.nn.Module:
        network = network.to(self.device)
        return network.to(memory_format=torch.channels_last) if self.channels_last else network

    def inputs(self, images: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> normalised float on the device. The layout changes while still uint8 (a quarter
        of the bytes to move); normalising keeps it."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return normalize(images)
