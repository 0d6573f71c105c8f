"""Extraction throughput: end-to-end images/s over pure-forward images/s, measured in the same run.

    python benchmarks/extract_throughput.py [--data ../shared/datasets/hymenoptera] [--loader auto|workers|inline]

End to end = the extract library call on a fresh embedding cache: read, hash, decode, preprocess,
forward, cache flush and store write (model loading, once per call, is printed apart). Pure forward =
the same backbone on ready tensors of the same batch size. Prints both and `ratio X` (target >= 0.85).

A small shared machine's speed drifts by tens of percent within seconds, so the two are measured in short
alternating slices (a few batches each, in ABBA order so a steady drift cancels) and the totals compared.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from pipeline.backbones import build_backbone
from pipeline.config import ExtractParams
from pipeline.dataset import Manifest, build_manifest, write_manifest
from pipeline.extract import extract
from pipeline.runtime import Runtime

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


class PureForward:
    """The backbone alone on a ready, normalised batch: the ceiling extraction can approach."""

    def __init__(self, params: ExtractParams):
        backbone = build_backbone(params.backbone)
        # As extract runs it (channels_last everywhere).
        self.runtime = Runtime.resolve(params.device, params.precision, option="--device", channels_last=True)
        self.device, self.precision = self.runtime.device, self.runtime.precision
        size = backbone.preprocessing.with_image_size(params.image_size).crop
        self.model = self.runtime.place(backbone.features).eval()
        self.batch = torch.randn(params.batch_size, 3, size, size, device=self.device)
        self.batch = self.batch.contiguous(memory_format=torch.channels_last)
        self.seconds(2)  # warm-up: allocator, kernel selection

    @torch.inference_mode()
    def seconds(self, n_batches: int) -> float:
        with self.runtime.autocast():
            _sync(self.device)
            start = time.perf_counter()
            for _ in range(n_batches):
                self.model(self.batch)
            _sync(self.device)
        return time.perf_counter() - start


def end_to_end_seconds(manifest: Manifest, data: Path, params: ExtractParams) -> tuple[float, float]:
    """(decode-to-store seconds, model loading seconds) of one extract call on a fresh embedding cache."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_manifest(manifest, work / "manifest.csv")
        result = extract(work / "manifest.csv", data, work / "features.h5", work / "cache", params)
    assert result.computed == len(manifest.rows)
    busy = result.compute_seconds + result.write_seconds
    return busy, result.seconds - busy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=DEFAULT_DATA, show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--loader", type=click.Choice(["auto", "workers", "inline"]), default="auto", show_default=True)
@click.option("--jpeg-draft/--no-jpeg-draft", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True)
@click.option("--slice-batches", type=int, default=3, show_default=True, help="Batches per alternating slice.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Passes over the dataset.")
def main(
    data, backbone, batch_size, num_workers, loader, jpeg_draft, device, precision, slice_batches, repeats
) -> None:
    params = replace(
        ExtractParams(),
        backbone=backbone,
        batch_size=batch_size,
        num_workers=num_workers,
        loader=loader,
        jpeg_draft=jpeg_draft,
        device=device,
        precision=precision,
    )
    full = build_manifest(data, 0.15, 0.15, seed=0)
    seen: set[str] = set()  # one row per content hash: each slice's images are all computed
    rows = [r for r in full.ok_rows() if not (r.sha256 in seen or seen.add(r.sha256))]
    random.Random(0).shuffle(rows)  # every slice mixes classes and image sizes
    per_slice = min(slice_batches * batch_size, len(rows) // batch_size * batch_size) or len(rows)
    slices = [rows[i : i + per_slice] for i in range(0, len(rows) - per_slice + 1, per_slice)]
    print(
        f"{len(rows)} images from {data}, {backbone}, batch {batch_size}, loader {loader}, workers {num_workers}, "
        f"draft {jpeg_draft}; {repeats} x {len(slices)} slices of {per_slice} images"
    )
    forward = PureForward(params)
    fwd_images = fwd_seconds = e2e_images = e2e_seconds = 0.0
    setup, pair_ratios = [], []
    for k, part in enumerate(slices * repeats):
        manifest = Manifest(part, full.layout, [])
        n_batches = -(-len(part) // batch_size)
        steps = ("forward", "e2e") if k % 2 == 0 else ("e2e", "forward")  # ABBA: a steady drift cancels
        for step in steps:
            if step == "forward":
                f = forward.seconds(n_batches)
                fwd_images, fwd_seconds = fwd_images + n_batches * batch_size, fwd_seconds + f
            else:
                e, s = end_to_end_seconds(manifest, data, params)
                e2e_images, e2e_seconds = e2e_images + len(part), e2e_seconds + e
                setup.append(s)
        pair_ratios.append((len(part) / e) / (n_batches * batch_size / f))
    fwd_rate, e2e_rate = fwd_images / fwd_seconds, e2e_images / e2e_seconds
    print(f"device {forward.device} precision {forward.precision} torch threads {torch.get_num_threads()}")
    print(f"model loading and hashing {statistics.median(setup):.2f} s per extract call (not in end-to-end)")
    print(f"forward images/s {fwd_rate:.1f} ({fwd_images:.0f} images in {fwd_seconds:.1f} s)")
    print(f"end-to-end images/s {e2e_rate:.1f} ({e2e_images:.0f} images in {e2e_seconds:.1f} s)")
    quartiles = statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) > 1 else pair_ratios * 3
    print(
        f"slice ratios: median {statistics.median(pair_ratios):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
        f"range {min(pair_ratios):.3f}-{max(pair_ratios):.3f} ({len(pair_ratios)} slices)"
    )
    print(f"ratio {e2e_rate / fwd_rate:.3f}")


if __name__ == "__main__":
    main()
