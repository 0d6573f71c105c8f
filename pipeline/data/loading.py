"""How images reach a network: the one image Dataset (manifest rows or plain files), its batches, the training
sampler of each rank, and the one inference loop."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.core.device import Runtime
from pipeline.core.errors import DataError
from pipeline.data.decoding import JpegDecoder
from pipeline.data.images import ImageRejected, confined, decode_rgb, jpeg_orientation, read_bytes


class ImageSource(Protocol):
    """A manifest row, as far as reading its image goes."""

    path: str  # relative to the data root
    sha256: str


@dataclass
class Item:
    """Dataset item `index`: its pixels, or the JPEG bytes a batched decoder has still to decode, or why the
    file could not be read."""

    index: int
    pixels: torch.Tensor | None = None  # uint8 [3, H, W]
    encoded: bytes | None = None  # the file (bytes pickle to the main process through the pipe: no shared fd)
    orientation: int = 1  # EXIF orientation of `encoded`
    rejected: ImageRejected | None = None


@dataclass
class Batch:
    """The readable images of a run of dataset items, and why the others could not be read."""

    images: torch.Tensor  # uint8 [B, 3, H, W]
    index: torch.Tensor  # int64 [B]: each image's position in the dataset
    rejected: list[tuple[int, str, str]]  # (position, reason, detail)
    encoded: list[Item] = field(default_factory=list)  # JPEGs left to a batched decoder (`Images.finish`)

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        return Batch(self.images.pin_memory(), self.index, self.rejected, self.encoded)


class Images(torch.utils.data.Dataset):
    """Decoded, resized and cropped images as uint8 tensors: item i is an `Item`.

    Built from manifest rows (`of_rows`), a file that changed since prepare or no longer decodes stops the run
    with its name: prepare vouched for it. Built from plain files (`of_files`), an unreadable file is reported
    with its reason and the rest go on. With a `JpegDecoder`, the JPEGs it takes are decoded by torchvision
    (in the item on CPU, a whole batch at once by `finish` on a GPU) and every other file by Pillow.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        transform: Callable,
        *,
        draft: int | None = None,
        names: Sequence[str] | None = None,
        sha256: Sequence[str] | None = None,
        jpeg: JpegDecoder | None = None,
        root: Path | None = None,
    ):
        self.paths, self.transform, self.draft = list(paths), transform, draft
        self.names, self.sha256, self.jpeg = names, sha256, jpeg
        self.root = None if root is None else Path(root)  # manifest rows: each must stay inside it

    @classmethod
    def of_rows(
        cls, root: Path, rows: Sequence[ImageSource], transform: Callable, draft: int | None = None, **kw
    ) -> Images:
        names = [r.path for r in rows]
        paths = [Path(root) / n for n in names]
        return cls(paths, transform, draft=draft, names=names, sha256=[r.sha256 for r in rows], root=root, **kw)

    @classmethod
    def of_files(cls, paths: Sequence[Path], transform: Callable, draft: int | None = None, **kw) -> Images:
        return cls(paths, transform, draft=draft, **kw)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        try:
            data = read_bytes(self.paths[i] if self.root is None else confined(self.root, self.names[i]))
        except ImageRejected as err:
            return self._rejected(i, err)
        if self.sha256 is not None and hashlib.sha256(data).hexdigest() != self.sha256[i]:
            raise DataError(f"{self.names[i]} changed since prepare ran; run `dvc repro` again")
        orientation = jpeg_orientation(data) if self.jpeg else None
        if orientation is None:
            return self._with_pillow(i, data)
        if self.jpeg.batched:
            return Item(i, encoded=data, orientation=orientation)
        (pixels,) = self.jpeg.decode([data], [orientation])
        return self._with_pillow(i, data) if pixels is None else Item(i, pixels=pixels)

    def _with_pillow(self, i: int, data: bytes) -> Item:
        try:
            return Item(i, pixels=self.transform(decode_rgb(data, self.draft)))
        except ImageRejected as err:
            return self._rejected(i, err)

    def _rejected(self, i: int, err: ImageRejected) -> Item:
        if self.sha256 is not None:
            raise DataError(f"{self.names[i]} passed prepare but now fails: {err}; run `dvc repro` again") from err
        return Item(i, rejected=err)

    def finish(self, batch: Batch, device: torch.device) -> Batch:
        """Decode the batch's pending JPEGs in one call on the device (a file the decoder refuses goes to
        Pillow) and join them to the others: every image on `device`, in dataset order."""
        if not batch.encoded:
            return batch
        pending = batch.encoded
        decoded = self.jpeg.decode([p.encoded for p in pending], [p.orientation for p in pending])
        items = [
            Item(p.index, pixels=x) if x is not None else self._with_pillow(p.index, p.encoded)
            for p, x in zip(pending, decoded, strict=True)
        ]
        for item in items:  # Pillow's fallbacks are on the CPU
            item.pixels = None if item.pixels is None else item.pixels.to(device)
        return concat([Batch(batch.images, batch.index, batch.rejected), collate(items)], device, sort=True)


def collate(items: list[Item]) -> Batch:
    ready = [it for it in items if it.pixels is not None]
    images = stack([it.pixels for it in ready])
    rejected = [(it.index, it.rejected.reason, it.rejected.detail) for it in items if it.rejected is not None]
    encoded = [it for it in items if it.encoded is not None]
    return Batch(images, torch.tensor([it.index for it in ready], dtype=torch.int64), rejected, encoded)


def stack(images: list[torch.Tensor], *, join: bool = False) -> torch.Tensor:
    """Images into one contiguous batch (`join`: batches into one), an empty uint8 tensor for none.

    On the CPU with numpy's copy, not torch's: torch's wakes its OpenMP threads, which then spin for a while on
    the cores the decoding threads and processes need (benchmarks/extract_throughput.py measures decoding).
    Contiguous, as torch.stack made it: the layout changes training's numerics.
    """
    if not images:
        return torch.zeros(0, dtype=torch.uint8)
    if any(x.device.type != "cpu" for x in images):
        return torch.cat(images) if join else torch.stack(images)
    shape = (sum(len(x) for x in images), *images[0].shape[1:]) if join else (len(images), *images[0].shape)
    out = torch.empty(shape, dtype=images[0].dtype)
    (np.concatenate if join else np.stack)([x.numpy() for x in images], out=out.numpy())
    return out


def concat(parts: list[Batch], device: torch.device, *, sort: bool = False) -> Batch:
    """One batch of the parts' images on `device` (each part copied as it is, from pinned memory on CUDA)."""
    images = [p.images.to(device, non_blocking=True) for p in parts if len(p.index)]
    index = torch.cat([p.index for p in parts])
    batch = Batch(
        stack(images, join=True),
        index,
        [r for p in parts for r in p.rejected],
        [e for p in parts for e in p.encoded],
    )
    if sort and len(index):
        order = index.argsort()
        batch.images, batch.index = batch.images[order.to(batch.images.device)], index[order]
    return batch


# Images a loader worker decodes per task: small enough that every worker is busy from the first forward batch.
CHUNK = 8


def image_batches(
    dataset: Images, batch_size: int, num_workers: int, device: torch.device, loader: str = "auto"
) -> Iterator[Batch]:
    """Batches of `dataset` in order, decoded where decoding slows the forward pass least, on `device`.

    `workers`: `num_workers` DataLoader processes, alive for the whole call, decode ahead while the forward
    pass runs, `CHUNK` images a task, at least two forward batches ahead; on CUDA the chunks land in pinned
    memory and are copied without blocking. On an accelerator the CPU is otherwise idle, so decoding costs
    nothing. `inline`: each batch is decoded by one thread per torch thread (Pillow and torchvision's decoder
    release the GIL), between forward passes. On CPU the forward pass already keeps every core busy: decoding
    beside it only takes cores away (each forward pass slows by more than decoding costs: a preempted intra-op
    thread stalls the others; benchmarks/extract_throughput.py measures both loaders). `auto`: workers on an
    accelerator, inline on CPU. JPEGs left to a batched decoder are decoded here, one call per batch.
    """
    if loader == "auto":
        loader = "inline" if device.type == "cpu" else "workers"
    batches = _worker_batches if loader == "workers" else _inline_batches
    for batch in batches(dataset, batch_size, num_workers, device):
        yield dataset.finish(batch, device)


def _worker_batches(dataset: Images, batch_size: int, num_workers: int, device: torch.device) -> Iterator[Batch]:
    chunk = min(CHUNK, batch_size)
    n = len(dataset)
    spans = [
        range(start, min(start + chunk, end))
        for first in range(0, n, batch_size)
        for end in [min(first + batch_size, n)]
        for start in range(first, end, chunk)
    ]
    ahead = max(2, math.ceil(2 * batch_size / (chunk * num_workers))) if num_workers else None
    parts = DataLoader(
        dataset,
        batch_sampler=spans,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=ahead,
    )
    done: list[Batch] = []
    for span, part in zip(spans, parts, strict=True):
        done.append(part)
        if span.stop % batch_size == 0 or span.stop == n:
            yield concat(done, device)
            done = []


def _inline_batches(dataset: Images, batch_size: int, num_workers: int, device: torch.device) -> Iterator[Batch]:
    # Each decoding thread runs torch's ops (torchvision's resize) on itself alone, as DataLoader workers do:
    # an OpenMP team per thread would put more threads than cores beside the forward pass.
    threads = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(
        threads, thread_name_prefix="decode", initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        for start in range(0, len(dataset), batch_size):
            yield collate(list(pool.map(dataset.__getitem__, range(start, min(start + batch_size, len(dataset))))))


class EpochShard(DistributedSampler):
    """Rank `rank`'s share (positions rank, rank + ranks, ...) of one permutation of the dataset per epoch, the
    same permutation on every rank: `set_epoch(e)` draws it from a generator seeded `seed + e`.

    With one rank it is the order DataLoader(shuffle=True) gives with a generator seeded `seed + e`, so one
    process draws the batches it drew before there were ranks; with R ranks and a per-rank batch of B / R, rank
    r's k-th batch holds the positions of global batch k that are r modulo R: the ranks together train on the
    global batches of one process. DistributedSampler's own permutation is another one (see `permutation`); its
    padding is kept.
    """

    def __iter__(self) -> Iterator[int]:
        order = self.permutation()
        if not order:
            return iter([])
        # DistributedSampler's padding: when the dataset does not split evenly, the first positions are repeated
        # (up to ranks - 1 images an epoch) so every rank takes as many batches; fine-tuning gives them weight 0.
        order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
        return iter(order[self.rank : self.total_size : self.num_replicas])

    def permutation(self) -> list[int]:
        """The permutation a DataLoader(shuffle=True) with this generator draws: it takes one int64 from the
        generator (its workers' base seed) before its RandomSampler calls randperm with the same generator.
        DistributedSampler calls randperm on a fresh generator, which gives another permutation."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(len(self.dataset), generator=generator).tolist()


def sharded_batches(
    dataset: Images,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sampler: EpochShard,
    generator: torch.Generator,
) -> DataLoader:
    """Training batches of this rank in `sampler`'s order; `generator` seeds the workers (and so their
    augmentation)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
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
