"""The runtime: devices named by who asked for them, one image Dataset for manifest rows and plain files."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.device import DeviceError, Runtime, resolve_device
from pipeline.core.errors import DataError
from pipeline.data.loading import Images, forward_batches, image_batches, predict_proba
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import build_backbone
from tests.conftest import prepare_manifest


def test_devices_resolve_and_a_missing_one_names_the_option_that_asked():
    assert resolve_device("cpu", "extract.device") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA")
    assert resolve_device("auto", "extract.device").type in ("cpu", "mps")
    with pytest.raises(DeviceError, match="finetune.device is cuda but no CUDA device is available"):
        resolve_device("cuda", "finetune.device")
    with pytest.raises(DeviceError, match="--device is cuda"):
        Runtime.resolve("cuda", "auto", option="--device")


def test_precision_auto_is_fp32_on_cpu_and_channels_last_follows_the_device():
    runtime = Runtime.resolve("cpu", "auto", option="extract.device")
    assert (runtime.precision, runtime.channels_last) == ("fp32", False)
    assert Runtime.resolve("cpu", "bf16", option="x", channels_last=True).channels_last


def test_plain_files_report_unreadable_ones_and_decode_the_rest(image_folder: Path, tmp_path: Path):
    good = sorted(image_folder.rglob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:60])
    to_uint8 = build_backbone("test_resnet").preprocessing.with_image_size(32).to_uint8
    dataset = Images.of_files([good[0], broken, *good[1:]], to_uint8)
    (batch,) = list(image_batches(dataset, batch_size=8, num_workers=0, device=torch.device("cpu")))
    assert batch.index.tolist() == [0, 2, 3]
    assert batch.images.shape == (3, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.images.is_contiguous()  # one layout whatever the decoder: it changes training's numerics
    assert [(i, reason) for i, reason, _ in batch.rejected] == [(1, "corrupt")]


def test_manifest_rows_stop_the_run_on_a_file_changed_since_prepare(image_folder: Path, tmp_path: Path):
    rows = read_manifest(prepare_manifest(image_folder, tmp_path / "manifest.csv")).ok_rows()
    (image_folder / rows[1].path).write_bytes((image_folder / rows[0].path).read_bytes())
    dataset = Images.of_rows(image_folder, rows, build_backbone("test_resnet").preprocessing.to_uint8)
    item = dataset[0]
    assert (item.pixels.dtype, item.index, item.rejected) == (torch.uint8, 0, None)
    with pytest.raises(DataError, match=f"{rows[1].path} changed since prepare ran"):
        dataset[1]


def test_one_inference_loop_serves_probabilities_and_skips_batches_with_no_readable_image(tmp_path: Path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_text("not an image")
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    runtime = Runtime.resolve("cpu", "auto", option="test")
    dataset = Images.of_files(sorted(tmp_path.iterdir()), lambda image: image)
    batches = list(image_batches(dataset, 1, 0, runtime.device))
    outputs = list(forward_batches(network, iter(batches), runtime, lambda x: x.float()))
    assert [len(b.rejected) for b, _ in outputs] == [1, 1]
    assert predict_proba(network, iter(batches), runtime, lambda x: x.float()).shape == (0, 0)
    images = torch.randint(0, 255, (5, 3, 4, 4), dtype=torch.uint8)
    batch = type(batches[0])(images, torch.arange(5), [])
    proba = predict_proba(network, iter([batch]), runtime, lambda x: x.float() / 255)
    assert proba.shape == (5, 4) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(1), 1.0)


@pytest.mark.parametrize("escape", ["absolute path", "climbs out", "link out"])
def test_a_manifest_row_leading_out_of_the_data_root_stops_the_run_before_it_is_read(image_folder, tmp_path, escape):
    rows = read_manifest(prepare_manifest(image_folder, tmp_path / "manifest.csv")).ok_rows()
    secret = tmp_path / "secret.png"
    secret.write_bytes((image_folder / rows[0].path).read_bytes())
    if escape == "link out":
        (image_folder / rows[0].path).unlink()
        (image_folder / rows[0].path).symlink_to(secret)
        row = rows[0]
    else:
        row = replace(rows[0], path=str(secret) if escape == "absolute path" else "../secret.png")
    dataset = Images.of_rows(image_folder, [row], build_backbone("test_resnet").preprocessing.to_uint8)
    with pytest.raises(DataError, match="outside_root"):
        dataset[0]


def test_every_blas_pool_but_numpys_gets_one_thread_so_idle_threads_do_not_take_the_cores():
    """numpy and scipy wheels each bring an OpenBLAS; L-BFGS alternates between them, and one's idle threads wait
    busily while the other's work (the sample's logistic head: 8.6 s with both at 2 threads, 0.8 s with scipy's at
    1). numpy's keeps its threads for the large products."""
    import numpy
    import scipy.linalg  # noqa: F401 (scipy's BLAS loaded, as in a head stage)
    from threadpoolctl import ThreadpoolController

    from pipeline.core.threads import one_blas_pool

    def blas() -> list:
        return ThreadpoolController().select(user_api="blas").lib_controllers

    libraries = blas()
    before = {lib.filepath: lib.num_threads for lib in libraries}
    numpy_dirs = {Path(numpy.__file__).parent, Path(numpy.__file__).parent.with_name("numpy.libs")}
    try:
        limited = one_blas_pool()
        after = {lib.filepath: lib.num_threads for lib in blas()}
    finally:
        for lib in libraries:
            lib.set_num_threads(before[lib.filepath])
    if len(before) < 2:
        pytest.skip("one BLAS library here: nothing to settle")
    for path, threads in before.items():
        if Path(path).parent in numpy_dirs:
            assert after[path] == threads
        else:
            assert after[path] == 1
    others = [Path(path).name for path, n in before.items() if Path(path).parent not in numpy_dirs and n > 1]
    assert sorted(limited) == sorted(others)


def test_every_command_settles_the_blas_pools_first(monkeypatch):
    import click
    from click.testing import CliRunner

    from pipeline.core import threads
    from pipeline.core.errors import user_errors

    calls = []
    monkeypatch.setattr(threads, "one_blas_pool", lambda: calls.append("settled") or [])

    @click.command()
    @user_errors
    def command() -> None:
        calls.append("ran")

    assert CliRunner().invoke(command).exit_code == 0
    assert calls == ["settled", "ran"]
