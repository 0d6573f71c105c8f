"""Extraction throughput: end-to-end images/s over pure-forward images/s, measured in the same run.

    python benchmarks/extract_throughput.py [--data ../shared/datasets/hymenoptera] [--batch-size 32]

End to end = the extract library call on a fresh embedding cache: read, hash, decode, preprocess,
forward, cache flush and store write (model loading, once per run, is printed apart). Pure forward =
the same backbone on ready tensors of the same batch size. Prints both and `ratio X` (target >= 0.85).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

from pipeline.backbones import build_backbone, resolve_device
from pipeline.config import ExtractParams
from pipeline.dataset import build_manifest, write_manifest
from pipeline.extract import extract, resolve_precision

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def forward_images_per_second(params: ExtractParams, n_images: int) -> float:
    """The backbone alone on ready tensors: the ceiling extraction can approach."""
    backbone = build_backbone(params.backbone)
    device = resolve_device(params.device)
    precision = resolve_precision(params.precision, device)
    size = backbone.preprocessing.with_image_size(params.image_size).crop
    model = backbone.features.to(device).eval().to(memory_format=torch.channels_last)
    batch = torch.randn(params.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    n_batches = max(1, n_images // params.batch_size)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(2):  # warm-up: allocator, kernel selection
            model(batch)
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            model(batch)
        _sync(device)
    return n_batches * params.batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=DEFAULT_DATA, show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--num-workers", type=int, default=2, show_default=True)
@click.option("--jpeg-draft/--no-jpeg-draft", default=True, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
def main(data, backbone, batch_size, num_workers, jpeg_draft, device, precision, repeats) -> None:
    params = replace(
        ExtractParams(),
        backbone=backbone,
        batch_size=batch_size,
        num_workers=num_workers,
        jpeg_draft=jpeg_draft,
        device=device,
        precision=precision,
    )
    manifest = build_manifest(data, 0.15, 0.15, seed=0)
    n = len(manifest.ok_rows())
    print(f"{n} images from {data}, {backbone}, batch {batch_size}, workers {num_workers}, draft {jpeg_draft}")
    forward, end_to_end, setup = [], [], []
    # Interleaved repeats, medians reported: a 2-core machine's speed drifts from one second to the next.
    for _ in range(repeats):
        forward.append(forward_images_per_second(params, n))
        with tempfile.TemporaryDirectory() as tmp:  # a fresh embedding cache: every image is computed
            work = Path(tmp)
            write_manifest(manifest, work / "manifest.csv")
            result = extract(work / "manifest.csv", data, work / "features.h5", work / "cache", params)
        # Decode, preprocess, forward, cache flush, store write; model loading (once per run) reported apart.
        end_to_end.append(result.computed / (result.compute_seconds + result.write_seconds))
        setup.append(result.seconds - result.compute_seconds - result.write_seconds)
    print(f"device {result.device} precision {result.precision} torch threads {torch.get_num_threads()}")
    print(f"model loading and hashing {statistics.median(setup):.1f} s per run (not in end-to-end)")
    print(f"forward images/s {statistics.median(forward):.1f} (runs: {', '.join(f'{v:.1f}' for v in forward)})")
    print(
        f"end-to-end images/s {statistics.median(end_to_end):.1f} (runs: {', '.join(f'{v:.1f}' for v in end_to_end)})"
    )
    print(f"ratio {statistics.median(end_to_end) / statistics.median(forward):.3f}")


if __name__ == "__main__":
    main()
