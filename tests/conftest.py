"""Shared fixtures: small generated ImageFolders and manifests, in-memory feature stores, the shared datasets.

Device: a test whose claim is exact (the same bytes twice, a resume that matches an uninterrupted run, the
stored embedding bit for bit) runs its networks on the CPU and says so: `device="cpu"` in its params,
`device: cpu` in the params.yaml it writes for a stage subprocess, `--device cpu` for `transfer predict`.
`device: auto` picks CUDA on a GPU machine, where bf16 autocast, TF32 convolutions and kernels chosen per
batch size change the last bits. Where a test states what holds on a GPU, it says how close is close enough.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import usable_cores
from pipeline.data.manifest import build_manifest, write_manifest
from pipeline.features.store import FeatureStore

pytest_plugins = ["tests.tiers"]  # the default tier's time limit

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def pytest_configure(config: pytest.Config) -> None:
    share_the_cores_between_test_workers()


def share_the_cores_between_test_workers() -> None:
    """Under pytest-xdist, each worker, and every stage subprocess it starts, runs torch on its share of the cores.

    torch starts one intra-op thread per core in every process, and each of its parallel ops waits for the
    slowest of them. Fourteen workers on sixteen cores ran over two hundred such threads: an op waits whenever
    one of its threads is preempted, and the CPU tests made of many small ops (batch-size-1 extraction and
    fine-tuning, in stage subprocesses too) hit the 45 s per-test timeout. Measured on 2 cores: two processes
    extracting at once take 14x as long with two threads each as with one. A worker's subprocesses inherit
    OMP_NUM_THREADS; a value already set is kept.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, usable_cores() // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def write_image_folder(
    root: Path, classes: dict[str, int], size: int = 32, seed: int = 0, fmt: str = "png"
) -> list[Path]:
    """Write `classes[name]` images per class under root/<name>/; each class has its own colour and pattern.

    The images are learnable (a class is a hue plus noise), deterministic, and all distinct.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for k, (name, count) in enumerate(sorted(classes.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(97 * k) % 256, (53 * k + 80) % 256, (181 * k + 40) % 256], dtype=np.float64)
        for i in range(count):
            noise = rng.normal(0, 40, size=(size, size, 3))
            stripes = (np.arange(size)[None, :, None] % (k + 2) == 0) * 60.0
            pixels = np.clip(base + noise + stripes, 0, 255).astype(np.uint8)
            path = folder / f"{name}_{i:03d}.{fmt}"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def prepare_manifest(root: Path, path: Path, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Path:
    """What the prepare stage writes for `root` (seed 0), at `path`."""
    write_manifest(build_manifest(root, val_fraction, test_fraction, seed=0), path)
    return path


def make_store(features, labels, split, classes: list[str], **attrs) -> FeatureStore:
    """A feature store in memory (row i of every array is one image), fingerprint "f" unless given."""
    n = len(labels)
    return FeatureStore(
        features=np.asarray(features, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        split=np.asarray(split, dtype=np.uint8),
        paths=[f"{i}.png" for i in range(n)],
        sha256=["0" * 64] * n,
        attrs={"classes": classes, "fingerprint": "f", **attrs},
    )


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A flat ImageFolder: three classes of 12 generated 32x32 PNGs."""
    root = tmp_path / "raw"
    write_image_folder(root, {"circle": 12, "square": 12, "triangle": 12})
    return root


@pytest.fixture
def hymenoptera() -> Path:
    """The shared ants/bees photos; the test is skipped when ../shared is absent."""
    root = SHARED_DATASETS / "hymenoptera"
    if not root.is_dir():
        pytest.skip("../shared/datasets/hymenoptera is not present")
    return root
