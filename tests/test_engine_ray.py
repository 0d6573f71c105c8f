"""The Ray engine on a real 2-CPU local Ray cluster: the same store as the local engine, through dead workers and a
killed driver, and the same one-line errors.

Every run is the extract stage in a subprocess, as DVC runs it, against one cluster started with `ray start` for
this module (RAY_ADDRESS). The local runs use one torch thread, as each actor does (extract.ray.cpus_per_actor: 1):
CPU kernels round differently with another thread count (pipeline/features/engines/ray_data.py), and the point here is
that the engines compute the same bytes from the same batches.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.core.config import ExtractParams, RayParams
from pipeline.core.errors import ConfigError
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import build_backbone
from pipeline.features.embedding import Embedding
from pipeline.features.engines.ray_data import check_room_to_decode
from pipeline.features.setup import Setup
from tests.conftest import REPO, prepare_manifest, write_image_folder

RAY = Path(sys.executable).with_name("ray")
IMAGES = {"a": 75, "b": 75}  # 150 images: 18 forward batches of 8 and one of 6, decoded 3 at a time
EMBEDDER = "MapBatches(Embedder)"  # in the process title of every embedding actor
# A cluster on this machine for this module alone: no token (Ray's token is per user, and this is not a cluster
# anyone else reaches).
TEST_CLUSTER = {"RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A head node of this module's own, on free ports (none of Ray's fixed defaults, which another cluster on this
    machine may hold), stopped by ending its `ray start --block` (and its process group), which stops what it
    started and nothing else."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    ports = {
        f"--{name}-port": _free_port()
        for name in ("dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export", "runtime-env-agent")
    }
    with log.open("w") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
             *(f"{k}={v}" for k, v in ports.items())],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **TEST_CLUSTER}, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(lambda: "Ray runtime started" in log.read_text() or head.poll() is not None, seconds=120)
        assert head.poll() is None, log.read_text()
        yield f"127.0.0.1:{port}"
    finally:  # SIGTERM drains the node for up to 30 s; what it has not stopped after 5 goes with its process group
        head.terminate()
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray") / "raw"
    write_image_folder(root, IMAGES, size=64)
    return root


def _work(parent: Path, name: str, root: Path, engine: str, entry: str = "{image_size: 64}") -> Path:
    work = parent / name
    work.mkdir()
    prepare_manifest(root, work / "manifest.csv")
    (work / "params.yaml").write_text(
        f"extract:\n  backbones:\n    test_efficientnet: {entry}\n  device: cpu\n  batch_size: 8\n"
        f"  engine: {engine}\n  ray:\n    actors: 1\n    cpus_per_actor: 1\n    decode_batch: 3\n"
    )
    return work


def _stage(work: Path, root: Path) -> list[str]:
    return [
        sys.executable, "-m", "stages.extract", "--backbone", "test_efficientnet", "--data", str(root),
        "--manifest", str(work / "manifest.csv"), "--out", str(work / "features.h5"),
        "--cache-dir", str(work / "cache"), "--metrics", str(work / "metrics"),
        "--params", str(work / "params.yaml"),
    ]  # fmt: skip


def _env(address: str) -> dict[str, str]:
    return {**os.environ, **TEST_CLUSTER, "RAY_ADDRESS": address, "OMP_NUM_THREADS": "1"}


def _run(work: Path, root: Path, address: str) -> subprocess.CompletedProcess:
    return subprocess.run(_stage(work, root), cwd=REPO, env=_env(address), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, images, ray_address) -> Path:
    work = _work(tmp_path_factory.mktemp("local"), "local", images, "local")
    done = _run(work, images, ray_address)
    assert done.returncode == 0, done.stderr
    return work / "features.h5"


def _assert_same_store(a: Path, b: Path) -> None:
    """Same datasets, byte for byte, and the same attributes but `created` (when the newest embedding was computed)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert set(fa) == set(fb)
        for key in fa:
            assert np.array_equal(fa[key][()], fb[key][()]), key
        attrs = {k: str(v) for k, v in fa.attrs.items() if k != "created"}
        assert attrs == {k: str(v) for k, v in fb.attrs.items() if k != "created"}


def _shards(work: Path) -> int:
    return len(list(work.glob("cache/*/shard-*.h5")))


@pytest.mark.integration
def test_ray_writes_the_store_the_local_engine_writes_and_reruns_compute_nothing(
    tmp_path, images, ray_address, local_store
):
    work = _work(tmp_path, "ray", images, "ray")
    first = _run(work, images, ray_address)
    assert first.returncode == 0, first.stderr
    assert "(150 computed, 0 reused)" in first.stdout
    _assert_same_store(local_store, work / "features.h5")
    again = _run(work, images, ray_address)
    assert again.returncode == 0 and "(0 computed, 150 reused)" in again.stdout


@pytest.mark.integration
def test_ray_computes_the_embedding_options_as_the_local_engine_does(tmp_path, images, ray_address):
    """The actors run the same Embedder: flip-averaged, two blocks pooled and concatenated, the same store."""
    entry = "{image_size: 64, tta: flip, layers: [-2, -1]}"
    works = [_work(tmp_path, engine, images, engine, entry) for engine in ("local", "ray")]
    for work in works:
        done = _run(work, images, ray_address)
        assert done.returncode == 0, done.stderr
    _assert_same_store(*(work / "features.h5" for work in works))
    expected = build_backbone("test_efficientnet", embedding=Embedding("flip", (-2, -1))).embedding_dim
    with h5py.File(works[1] / "features.h5", "r") as f:
        assert f["features"].shape == (150, expected) and expected > 256  # two blocks, not the network's own 256


def _embedding_actors() -> list[int]:
    """The process ids of the running embedding actors, by the title Ray gives their processes."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if EMBEDDER.encode() in title:
                pids.append(int(proc.name))
    return pids


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.integration
def test_an_actor_killed_mid_run_is_restarted_by_ray_and_the_store_is_the_same(
    tmp_path, images, ray_address, local_store
):
    work = _work(tmp_path, "ray", images, "ray")
    driver = subprocess.Popen(_stage(work, images), cwd=REPO, env=_env(ray_address), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(lambda: _shards(work) >= 2)
    actors = _embedding_actors()  # this run's one actor (and any a finished run left, which nothing uses)
    assert actors
    for pid in actors:
        os.kill(pid, signal.SIGKILL)
    flushed = _shards(work)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err
    assert flushed < 19, "the run was over before the actor was killed"
    assert "(150 computed, 0 reused)" in out
    _assert_same_store(local_store, work / "features.h5")


@pytest.mark.integration
def test_a_killed_driver_reruns_only_what_the_cache_lacks(tmp_path, images, ray_address, local_store):
    work = _work(tmp_path, "ray", images, "ray")
    driver = subprocess.Popen(_stage(work, images), cwd=REPO, env=_env(ray_address), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for(lambda: _shards(work) >= 2)
    driver.kill()
    driver.wait()
    flushed = _shards(work)
    assert driver.returncode == -signal.SIGKILL and 2 <= flushed < 19
    assert not (work / "features.h5").exists()
    rerun = _run(work, images, ray_address)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({150 - 8 * flushed} computed, {8 * flushed} reused)" in rerun.stdout
    _assert_same_store(local_store, work / "features.h5")


@pytest.mark.integration
def test_a_file_changed_since_prepare_fails_with_the_local_engines_line(tmp_path, images, ray_address):
    root = tmp_path / "raw"
    write_image_folder(root, {"a": 6, "b": 6}, size=64)
    victim = sorted(root.glob("b/*"))[1]
    errors = {}
    for engine in ("local", "ray"):
        work = _work(tmp_path, engine, root, engine)
        victim.write_bytes(victim.read_bytes() + b"edited")
        failed = _run(work, root, ray_address)
        errors[engine] = failed.stderr.strip().splitlines()[-1]
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        victim.write_bytes(victim.read_bytes().removesuffix(b"edited"))
    assert errors["ray"] == errors["local"]
    assert errors["local"] == f"Error: b/{victim.name} changed since prepare ran; run `dvc repro` again"


def test_without_ray_the_engine_is_a_one_line_error(tmp_path, images):
    work = _work(tmp_path, "noray", images, "ray")
    # As if Ray were not installed: `import ray` raises ImportError.
    code = "import sys; sys.modules['ray'] = None; from stages.extract import main; main()"
    failed = subprocess.run([sys.executable, "-c", code, *_stage(work, images)[3:]], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        "Error: extract.engine is ray but Ray Data is not installed: pip install -e '.[ray]' in the project's folder "
        "(or set extract.engine: local)"
    ]


def test_a_device_the_actors_do_not_have_is_a_params_error(tmp_path, images):
    manifest = read_manifest(prepare_manifest(images, tmp_path / "manifest.csv"))
    params = ExtractParams.of("test_efficientnet", engine="ray", device="cuda", ray=RayParams(gpus_per_actor=0))
    with pytest.raises(ConfigError, match="extract.device is cuda but the Ray actors run on cpu"):
        Setup.resolve(params, "test_efficientnet", manifest)


@pytest.mark.parametrize(
    ("cpus", "actors", "per_actor", "refused"), [(2, 1, 1, False), (2, 2, 1, True), (8, 3, 2, False), (8, 4, 2, True)]
)
def test_actors_must_leave_a_cpu_for_decoding(cpus, actors, per_actor, refused):
    settings = RayParams(actors=actors, cpus_per_actor=per_actor)
    if refused:
        with pytest.raises(ConfigError, match="leaving none for the decode tasks"):
            check_room_to_decode(cpus, settings)
    else:
        check_room_to_decode(cpus, settings)
