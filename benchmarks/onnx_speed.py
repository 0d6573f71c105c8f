"""Images/s of an exported model in onnxruntime against the same network in PyTorch, on this CPU.

    python benchmarks/onnx_speed.py [--backbone efficientnet_lite0] [--image-size 224] [--batch-size 1 --batch-size 32]
        [--slice-images 64] [--repeats 5]

The network is what the export stage writes for a fine-tuned model: uint8 images in, normalisation, the
backbone's features, an output layer (here the backbone's own ImageNet classifier: real weights, 1000 classes)
and softmax, exported by pipeline.serving.export.write_onnx and run by pipeline.serving.onnx_predict.OnnxPredictor (what
`transfer predict --model` runs). PyTorch runs the same module under torch.inference_mode in fp32, as
`transfer predict --finetuned` does on the CPU (NCHW) and as `--head` runs the backbone (channels-last).
Inputs are ready uint8 tensors (seeded random pixels): decoding and resizing are not timed.

A small shared machine's speed drifts by tens of percent within seconds, so the engines are timed in short
alternating slices (`--slice-images` images each, the order rotating every repeat) and compared slice by slice.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import onnxruntime
import torch
from torch import nn

from pipeline.features.backbones import DEFAULT_BACKBONE, build_backbone
from pipeline.serving.export import Deployable, Softmax, write_onnx
from pipeline.serving.onnx_predict import OnnxPredictor


def engines(backbone_name: str, image_size: int | None, folder: Path) -> tuple[dict[str, Callable], int]:
    """Each engine as a function of a uint8 batch [B, 3, S, S] -> probabilities (numpy), and S."""
    backbone = build_backbone(backbone_name)
    preprocessing = backbone.preprocessing.with_image_size(image_size)
    network = Deployable(preprocessing, nn.Sequential(backbone.features, backbone.classifier), Softmax()).eval()
    path = folder / "model.onnx"
    metadata = {"classes": backbone.categories, "preprocessing": {}, "jpeg_draft": False}
    write_onnx(network, preprocessing.crop, path, metadata, opset=18)
    exported = OnnxPredictor(path)
    channels_last = copy.deepcopy(network).to(memory_format=torch.channels_last)  # .to() is in place

    def pytorch(model: nn.Module, layout: torch.memory_format) -> Callable:
        def run(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(images).contiguous(memory_format=layout)).numpy()

        return run

    runs = {
        "onnxruntime": exported.probabilities,
        "pytorch NCHW": pytorch(network, torch.contiguous_format),
        "pytorch channels-last": pytorch(channels_last, torch.channels_last),
    }
    return runs, preprocessing.crop


def seconds(run: Callable, images: np.ndarray, batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        run(images[i : i + batch_size])
    return time.perf_counter() - start


@click.command()
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True)
@click.option("--image-size", type=int, default=None, help="Crop size; default: the weights' own (224).")
@click.option("--batch-size", "batch_sizes", type=int, multiple=True, default=(1, 32), show_default=True)
@click.option("--slice-images", type=int, default=64, show_default=True, help="Images per timed slice.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Slices per engine and batch size.")
def main(backbone: str, image_size: int | None, batch_sizes: tuple[int, ...], slice_images: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs, size = engines(backbone, image_size, Path(tmp))
        images = np.random.default_rng(0).integers(0, 256, size=(slice_images, 3, size, size), dtype=np.uint8)
        outputs = {name: run(images[:8]) for name, run in runs.items()}  # warm-up, and the same answers?
        gap = max(float(np.abs(out - outputs["pytorch NCHW"]).max()) for out in outputs.values())
        click.echo(f"{backbone} at {size} px, {slice_images} images per slice, {repeats} slices per engine")
        click.echo(
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
            f"(default threads); largest probability difference between engines {gap:.1e}"
        )
        for batch_size in batch_sizes:
            timed: dict[str, list[float]] = {name: [] for name in runs}
            names = list(runs)
            for r in range(repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
                    timed[name].append(seconds(runs[name], images, batch_size))
            rates = {name: slice_images / statistics.median(t) for name, t in timed.items()}
            # Per slice pair: how many times faster onnxruntime ran than each PyTorch layout timed next to it.
            speedups = {
                name: statistics.median(t / o for t, o in zip(timed[name], timed["onnxruntime"], strict=True))
                for name in names[1:]
            }
            line = ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
            ratio = ", ".join(f"{speedup:.2f}x {name}" for name, speedup in speedups.items())
            click.echo(f"batch {batch_size}: images/s {line}; onnxruntime is {ratio}")


if __name__ == "__main__":
    main()
