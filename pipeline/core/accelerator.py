"""Whether to compute on a CUDA GPU, decided without importing torch: the stages that train heads and search
neighbours on cached features import torch only when they will use the GPU (importing it costs seconds)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError

# Where the NVIDIA driver lists its GPUs on Linux; /dev/nvidia0 is the first GPU's device file.
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_DEVICE = Path("/dev/nvidia0")


def cuda_present() -> bool:
    """A CUDA GPU's driver is loaded on this machine (torch may still lack CUDA support; `use_cuda` then says so)."""
    return (NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir())) or NVIDIA_DEVICE.exists()


def use_cuda(device: str, option: str) -> bool:
    """`device` (auto, cpu or cuda) resolved: auto is CUDA when a GPU is present. `cuda` without one, or with a torch
    that cannot reach it, is a one-line error naming `option`."""
    if device == "cpu" or (device == "auto" and not cuda_present()):
        return False
    import torch  # only where a GPU will be used

    if torch.cuda.is_available():
        return True
    if device == "auto":
        return False
    raise PipelineError(f"{option} is cuda but no CUDA device is available; use auto or cpu")


# CPU flags (Linux /proc/cpuinfo) of a native bfloat16 dot product: x86's AVX512-BF16 and AMX, Arm's BF16.
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_multiplies_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively, where a bfloat16 matrix product runs about 4x faster than a
    float32 one (elsewhere torch emulates it, slower than float32). Read from the flags the kernel lists."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return bool(BF16_FLAGS & set(value.split()))
    return False
