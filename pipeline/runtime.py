"""Where networks run and how images reach them: device, precision, one image Dataset, one inference loop."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.errors import DataError, PipelineError
from pipeline.images import ImageRejected, decode_rgb, read_bytes


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


class ImageSource(Protocol):
    """A manifest row, as far as reading its image goes."""

    path: str  # relative to the data root
    sha256: str


@dataclass
class Batch:
    """The readable images of a run of dataset items, and why the others could not be read."""

    images: torch.Tensor  # uint8 [B, 3, H, W]
    index: torch.Tensor  # int64 [B]: each image's position in the dataset
    rejected: list[tuple[int, str, str]]  # (position, reason, detail)

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return Batch(self.images.pin_memory(), self.index, self.rejected)


class Images(torch.utils.data.Dataset):
    """Decoded, resized and cropped images as uint8 tensors: item i is (tensor, i, rejection).

    Built from manifest rows (`of_rows`), a file that changed since prepare or no longer decodes stops the run
    with its name: prepare vouched for it. Built from plain files (`of_files`), an unreadable file is reported
    with its reason (an empty tensor and the `ImageRejected`) and the rest go on.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable,
        *,
        draft: int | None = None,
        names: Sequence[str] | None = None,
        sha256: Sequence[str] | None = None,
    ):
        self.paths, self.transform, self.draft = list(paths), transform, draft
        self.names, self.sha256 = names, sha256

    @classmethod
    def of_rows(cls, root: Path, rows: Sequence[ImageSource], transform: Callable, draft: int | None = None) -> Images:
        names = [r.path for r in rows]
        return cls(
            [Path(root) / n for n in names], transform, draft=draft, names=names, sha256=[r.sha256 for r in rows]
        )

    @classmethod
    def of_files(cls, paths: Sequence[Path], transform: Callable, draft: int | None = None) -> Images:
        return cls(paths, transform, draft=draft)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, ImageRejected | None]:
        try:
            data = read_bytes(self.paths[i])
            if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256[i]:
                raise DataError(f"{self.names[i]} changed since prepare ran; run `dvc repro` again")
            image = decode_rgb(data, self.draft)
        except ImageRejected as err:
            if self.sha256 is not None:
                raise DataError(f"{self.names[i]} passed prepare but now fails: {err}; run `dvc repro` again") from err
            return torch.zeros(0, dtype=torch.uint8), i, err
        return self.transform(image), i, None


def collate(items: list[tuple[torch.Tensor, int, ImageRejected | None]]) -> Batch:
    ok = [(x, i) for x, i, why in items if why is None]
    images = torch.stack([x for x, _ in ok]) if ok else torch.zeros(0, dtype=torch.uint8)
    rejected = [(i, why.reason, why.detail) for _, i, why in items if why is not None]
    return Batch(images, torch.tensor([i for _, i in ok], dtype=torch.int64), rejected)


def image_batches(
    dataset: Images, batch_size: int, num_workers: int, device: torch.device, loader: str = "auto"
) -> Iterator[Batch]:
    """Batches of `dataset` in order, decoded where decoding slows the forward pass least.

    `workers`: `num_workers` DataLoader processes decode ahead while the forward pass runs. On an accelerator
    the CPU is otherwise idle, so decoding costs nothing; batches land in pinned memory for non-blocking copies.
    `inline`: each batch is decoded by one thread per torch thread (Pillow releases the GIL while it decodes and
    resamples), between forward passes. On CPU the forward pass already keeps every core busy: decoding beside
    it only takes cores away (measured on 2 cores: each forward pass slower by more than decoding costs; likely a
    preempted intra-op thread stalling the others; README, "Extraction speed"). `auto`: workers on an
    accelerator, inline on CPU.
    """
    if loader == "auto":
        loader = "inline" if device.type == "cpu" else "workers"
    if loader == "workers":
        yield from DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
        )
        return
    with ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="decode") as pool:
        for start in range(0, len(dataset), batch_size):
            yield collate(list(pool.map(dataset.__getitem__, range(start, min(start + batch_size, len(dataset))))))


def shuffled_batches(
    dataset: Images, batch_size: int, num_workers: int, device: torch.device, generator: torch.Generator
) -> DataLoader:
    """Training batches in the order `generator` draws (it also seeds the workers, and so the augmentation)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )


@torch.inference_mode()
def forward_batches(
    network: torch.nn.Module, batches: Iterator[Batch], runtime: Runtime, normalize: Callable
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """The one inference loop: each batch with the network's output for its readable images (on the device)."""
    network.eval()
    for batch in batches:
        if not len(batch.index):
            yield batch, torch.zeros(0)
            continue
        with runtime.autocast():
            output = network(runtime.inputs(batch.images, normalize))
        yield batch, output  # outside autocast: what the caller does with it runs at its own precision


def predict_proba(
    network: torch.nn.Module, batches: Iterator[Batch], runtime: Runtime, normalize: Callable
) -> np.ndarray:
    """Softmax probabilities (float64) of every readable image the batches hold, in order."""
    out = [
        logits.double().softmax(1).cpu().numpy()
        for batch, logits in forward_batches(network, batches, runtime, normalize)
        if len(batch.index)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0))
