"""Peak memory of extraction at two dataset sizes: it must stay flat as the dataset grows.

    python benchmarks/extract_memory.py [--small 500] [--large 20000] [--image-size 64]

Writes N generated 64x64 PNGs, runs prepare + the extract stage in a fresh process for each size, and
samples the resident memory of that process and its DataLoader workers together (psutil, every 50 ms).
Prints both peaks and their difference (target: within 300 MB).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import psutil
from PIL import Image

from pipeline.data.manifest import build_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


def write_images(root: Path, n: int, size: int, n_classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % n_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def peak_tree_rss(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; return (peak RSS of it plus its children in MB, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            # PSS shares each page among the processes mapping it: forked workers are not double-counted.
            total = sum(p.memory_full_info().pss for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
        peak = max(peak, total)
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return peak / 2**20, time.perf_counter() - start


def measure(work: Path, n: int, image_size: int, backbone: str) -> tuple[float, float]:
    raw = work / "raw"
    write_images(raw, n, 64)
    write_manifest(build_manifest(raw, 0.15, 0.15, seed=0), work / "manifest.csv")
    (work / "params.yaml").write_text(
        f"extract:\n  backbones:\n    {backbone}:\n      image_size: {image_size}\n  batch_size: 64\n  device: cpu\n"
    )
    cmd = [
        sys.executable, "-m", "stages.extract", "--data", str(raw), "--manifest", str(work / "manifest.csv"),
        "--backbone", backbone, "--out", str(work / "features.h5"), "--cache-dir", str(work / "cache"),
        "--metrics", str(work / "extract.json"), "--params", str(work / "params.yaml"),
    ]  # fmt: skip
    return peak_tree_rss(cmd)


@click.command()
@click.option("--small", type=int, default=500, show_default=True)
@click.option("--large", type=int, default=20_000, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
def main(small: int, large: int, image_size: int, backbone: str) -> None:
    results = {}
    for n in (small, large):
        with tempfile.TemporaryDirectory() as tmp:
            results[n] = measure(Path(tmp), n, image_size, backbone)
            print(f"{n} images: peak PSS {results[n][0]:.0f} MB (process + workers), {results[n][1]:.0f} s")
    print(f"difference {results[large][0] - results[small][0]:.0f} MB (target <= 300)")


if __name__ == "__main__":
    main()
