"""What running a network costs: its forward milliseconds per image where it runs, and its parameters.

Extraction times its backbone and evaluate_finetune the fine-tuned network, each on the device and precision it ran
on; the report only reads their numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.timing import median_ms_per_row
from pipeline.data.loading import Runtime
from pipeline.data.preprocessing import Preprocessing

BATCH = 32  # images per timed forward pass


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def forward_ms_per_row(network: nn.Module, x: torch.Tensor, runtime: Runtime) -> float:
    """`network`'s forward pass on `x` (on the runtime's device), in milliseconds per row: in eval mode, without
    autograd, at the runtime's precision (pipeline.core.timing: the median of 5 after a warm-up)."""
    network.eval()

    def run() -> None:
        with torch.inference_mode(), runtime.autocast():
            network(x)
        _wait_for(runtime.device)

    return median_ms_per_row(run, len(x))


def random_images(runtime: Runtime, preprocessing: Preprocessing, batch: int = BATCH) -> torch.Tensor:
    """A batch of seeded random images at the preprocessing's size, fed as the runtime feeds real ones (layout,
    normalisation); the global random state is left alone."""
    size = (batch, 3, preprocessing.crop, preprocessing.crop)
    images = torch.randint(0, 256, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return runtime.inputs(images, preprocessing.normalize)


def random_features(runtime: Runtime, feature_dim: int, batch: int = BATCH) -> torch.Tensor:
    """A batch of seeded random embeddings on the runtime's device: the input of an output layer alone."""
    return torch.randn(batch, feature_dim, generator=torch.Generator().manual_seed(0)).to(runtime.device)


def _wait_for(device: torch.device) -> None:
    """Return once the device has finished what was launched on it (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
