"""Choosing the GPU for heads and neighbour search without importing torch on a machine that has none."""

import subprocess
import sys

import pytest

from pipeline.core import accelerator
from pipeline.core.errors import PipelineError
from tests.conftest import REPO


def test_cpu_and_auto_without_a_gpu_import_no_torch(tmp_path, monkeypatch):
    code = (
        "import sys; from pipeline.core import accelerator as a; "
        f"a.NVIDIA_GPUS = a.Path({str(tmp_path / 'none')!r}); a.NVIDIA_DEVICE = a.Path({str(tmp_path / 'none0')!r}); "
        "print(a.use_cuda('auto', 'heads.x.device'), a.use_cuda('cpu', 'heads.x.device'), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator, "NVIDIA_GPUS", tmp_path / "gpus")
    monkeypatch.setattr(accelerator, "NVIDIA_DEVICE", tmp_path / "nvidia0")
    (tmp_path / "nvidia0").touch()  # a driver says there is a GPU, torch (CPU build here) cannot reach it
    assert accelerator.cuda_present()
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert accelerator.use_cuda("auto", "heads.x.device") is False
    with pytest.raises(PipelineError, match="heads.x.device is cuda but no CUDA device is available"):
        accelerator.use_cuda("cuda", "heads.x.device")


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),  # Arm
        ("", False),
    ],
)
def test_the_cpu_multiplies_bf16_natively_where_its_flags_say_so(tmp_path, cpuinfo, expected):
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    assert accelerator.cpu_multiplies_bf16(tmp_path / "cpuinfo") is expected
    assert accelerator.cpu_multiplies_bf16(tmp_path / "missing") is False
