"""Fine-tuning with torchrun: two CPU ranks (gloo) train the weights one process trains, write once, resume.

Every run here is on the CPU with `num_workers: 0` and no augmentation, so each one is deterministic; the ranks
are real processes started by torch.distributed.run (nothing of torch.distributed is mocked).

What "the same weights" means between one process and two ranks: each rank computes its half of every global
batch and DistributedDataParallel adds the two gradients, where one process sums the whole batch in one
convolution; the float32 sums are done in another order (and with one intra-op thread per rank instead of two),
so the weights differ in their last bits. Measured on this 2-core machine: at most 6.0e-8 after 3 epochs
(`test_two_ranks_train_the_weights_of_one_process`; 1.2e-7 with 240 training images). The tolerance, atol
1e-5, leaves a margin of more than 80x, and is 100x below what a wrong split gives: each rank's plain mean
loss (what DDP averages by default, wrong for the last batch of 5, split 3 + 2 plus a padded repeat) moved
the weights by 1.0e-3 here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from pipeline.core.config import FinetuneParams, TorchrunParams, load_params, rank_batch_size
from pipeline.core.errors import ConfigError
from pipeline.data.loading import EpochShard
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import build_backbone
from pipeline.finetuning.checkpoint import read_checkpoint, run_key
from pipeline.finetuning.distributed import torchrun_args
from pipeline.finetuning.training import finetune
from pipeline.finetuning.warm_start import initial_layer
from tests.conftest import REPO, prepare_manifest, write_image_folder

ATOL = 1e-5  # the module docstring says why
BACKBONE = "test_efficientnet"
PARAMS = (
    f"extract:\n  backbones:\n    {BACKBONE}: {{}}\nfinetune:\n  epochs: 3\n  batch_size: 8\n  init_head: random\n"
    "  augment: false\n  image_size: 48\n  num_workers: 0\n  device: cpu\n  early_stopping_patience: 0\n"
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _setup(work: Path, root: Path, extra: str = "") -> Path:
    """A work folder for the stage: manifest, the new layer's seeded random start, params.yaml (+ `extra`)."""
    work.mkdir()
    manifest = read_manifest(prepare_manifest(root, work / "manifest.csv"))
    layer = initial_layer(build_backbone(BACKBONE), manifest, FinetuneParams(init_head="random"))
    save_file(layer, work / "init.safetensors")
    (work / "params.yaml").write_text(PARAMS + extra)
    return work


def _stage(work: Path, root: Path, launcher: list[str] | None = None) -> list[str]:
    """The stage's command line, as dvc.yaml runs it (`launcher`: under a torchrun started by hand)."""
    return [
        *(launcher or [sys.executable]), "-m", "stages.finetune", "--data", str(root),
        "--manifest", str(work / "manifest.csv"), "--init", str(work / "init.safetensors"),
        "--out", str(work / "out"), "--checkpoints", str(work / "ckpt"), "--live", str(work / "live"),
        "--params", str(work / "params.yaml"),
    ]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """45 train images (5 full batches of 8 and a last one of 5, which 2 ranks split 3 + 2 plus one padded
    image), 48 px: each epoch takes a fraction of a second, a stage run under torchrun about 10 s."""
    root = tmp_path_factory.mktemp("ddp") / "raw"
    write_image_folder(root, {"a": 38, "b": 37}, size=48)
    return root


@pytest.fixture(scope="module")
def two_ranks(images: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run of the stage with `finetune.engine: torchrun` (2 CPU ranks, gloo)."""
    work = _setup(tmp_path_factory.mktemp("ddp") / "two", images, "  engine: torchrun\n")
    run = _run(_stage(work, images))
    assert run.returncode == 0, run.stderr
    return work, run


def test_the_shards_of_two_ranks_are_the_global_batches_of_one_process():
    """Rank r's k-th batch of 4 is the images of one process's k-th batch of 8 at positions r, r + 2, ...; and
    one rank draws exactly the order one process drew before ranks existed (DataLoader(shuffle=True))."""
    for n, seed in [(45, 0), (8, 100_003), (17, 300_009)]:
        for epoch in (0, 3):
            generator = torch.Generator().manual_seed(seed + epoch)
            batches = [b.tolist() for b in DataLoader(range(n), batch_size=8, shuffle=True, generator=generator)]
            shards = []
            for rank in (0, 1):
                shard = EpochShard(range(n), num_replicas=2, rank=rank, seed=seed)
                shard.set_epoch(epoch)
                shards.append([b.tolist() for b in DataLoader(range(n), batch_size=4, sampler=shard)])
            single = EpochShard(range(n), num_replicas=1, rank=0, seed=seed)
            single.set_epoch(epoch)
            assert [i for b in batches for i in b] == list(single)
            assert len(shards[0]) == len(shards[1]) == len(batches)
            for k, batch in enumerate(batches):
                interleaved = [i for pair in zip(shards[0][k], shards[1][k], strict=False) for i in pair]
                assert interleaved[: len(batch)] == batch  # past that: the padding, repeats of the first images


@pytest.mark.integration
def test_two_ranks_train_the_weights_of_one_process(images, two_ranks, tmp_path):
    work, run = two_ranks
    single = _setup(tmp_path / "one", images)
    params = load_params(single / "params.yaml").finetune
    one = finetune(
        single / "manifest.csv", images, BACKBONE, params, single / "out", single / "ckpt",
        initial=load_file(single / "init.safetensors"),
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("finetune:")]
    assert len(lines) == 1 and "3 epochs" in lines[0] and "on 2 x cpu" in lines[0]  # written once, by one rank
    assert (work / "out" / "model.safetensors").is_file() and (work / "live" / "metrics.json").is_file()
    distributed = load_file(work / "out" / "model.safetensors")
    assert _max_difference(distributed, load_file(single / "out" / "model.safetensors")) < ATOL
    saved = read_checkpoint(next((work / "ckpt").glob("*/checkpoint.pt")))
    assert [h["epoch"] for h in saved["history"]] == [h["epoch"] for h in one.history] == [1, 2, 3]
    for ranks, alone in zip(saved["history"], one.history, strict=True):
        assert ranks["val_accuracy"] == alone["val_accuracy"]  # 15 val images, each scored by one rank
        assert ranks["train_accuracy"] == alone["train_accuracy"]
        # The losses differ as the weights do: measured 1.5e-8 at most (train), under 1e-9 (val).
        assert ranks["val_loss"] == pytest.approx(alone["val_loss"], abs=1e-6)
        assert ranks["train_loss"] == pytest.approx(alone["train_loss"], abs=1e-6)


@pytest.mark.integration
def test_torchrun_by_hand_trains_the_new_layer_alone_with_unfreeze_zero(images, tmp_path):
    """Under a torchrun started by hand the stage trains as a rank (engine local notwithstanding); with every
    backbone parameter frozen DDP has the head's two tensors only, and no "unused parameters" error."""
    work = _setup(tmp_path / "hand", images, "  unfreeze: 0\n")
    run = _run(_stage(work, images, TORCHRUN))
    assert run.returncode == 0, run.stderr
    assert sum(line.startswith("finetune:") for line in run.stdout.splitlines()) == 1
    assert " 514 of " in run.stdout and "on 2 x cpu" in run.stdout  # the new layer: 256 features x 2 classes + 2
    tuned, start = load_file(work / "out" / "model.safetensors"), build_backbone(BACKBONE).features.state_dict()
    assert all(torch.equal(tuned[f"features.{k}"], v) for k, v in start.items())
    params = load_params(work / "params.yaml").finetune
    alone = tmp_path / "alone"
    finetune(
        work / "manifest.csv",
        images,
        BACKBONE,
        params,
        alone,
        tmp_path / "ckpt",
        initial=load_file(work / "init.safetensors"),
    )
    assert _max_difference(tuned, load_file(alone / "model.safetensors")) < ATOL
    assert not torch.equal(tuned["head.weight"], load_file(work / "init.safetensors")["weight"])


def test_a_batch_size_that_does_not_split_between_the_ranks_is_a_one_line_error(images, tmp_path):
    work = _setup(tmp_path / "odd", images, "  engine: torchrun\n")
    (work / "params.yaml").write_text(PARAMS.replace("batch_size: 8", "batch_size: 9") + "  engine: torchrun\n")
    run = _run(_stage(work, images))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "Error: finetune.batch_size 9 does not split evenly between 2 processes "
        "(finetune.torchrun.nproc_per_node x nnodes); use a multiple of 2"
    )
    assert "Traceback" not in run.stderr and not (work / "ckpt").exists()
    with pytest.raises(ConfigError, match="batch_size 6 does not split evenly between 4 processes"):
        rank_batch_size(6, 4)
    # params.yaml itself is refused, so check_params stops `dvc repro` before DVC deletes any output.
    with pytest.raises(ConfigError, match="batch_size 9 does not split evenly between 2 processes"):
        FinetuneParams(batch_size=9, engine="torchrun")


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="the ranks fail for want of a CUDA device")
def test_a_failed_rank_ends_the_stage_with_one_line(images, tmp_path):
    """Each rank refuses a CUDA device this machine lacks; the launcher says which rank failed, no traceback."""
    work = _setup(tmp_path / "fail", images, "  engine: torchrun\n")
    (work / "params.yaml").write_text(PARAMS.replace("device: cpu", "device: cuda") + "  engine: torchrun\n")
    run = _run(_stage(work, images))
    assert run.returncode == 1
    assert "Error: finetune.device is cuda but no CUDA device is available" in run.stderr  # the rank's own
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: finetune: rank ") and "failed with exit code 1" in last
    assert "Traceback" not in run.stderr


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's ranks are in sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the ranks die with torchrun on Linux")
def test_killing_every_rank_during_epoch_two_resumes_there_with_the_same_weights(images, two_ranks, tmp_path):
    clean, _ = two_ranks
    work = _setup(tmp_path / "killed", images, "  engine: torchrun\n")
    launcher = subprocess.Popen(
        _stage(work, images), cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    for line in launcher.stderr:
        # In epoch 2 of 3: two epochs left before the run could end, the margin a loaded machine has to kill it.
        if "epoch 1:" in line and "checkpoint saved" in line:
            ranks = _children(launcher.pid)
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher: its ranks die with it (PR_SET_PDEATHSIG)
            break
    launcher.stderr.close()
    assert launcher.wait() == -signal.SIGKILL and len(ranks) == 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in ranks)
    saved = read_checkpoint(next((work / "ckpt").glob("*/checkpoint.pt")))
    assert saved["epoch"] == 1 and not (work / "out").exists()

    resumed = _run(_stage(work, images))
    assert resumed.returncode == 0, resumed.stderr
    assert "3 epochs, resumed at epoch 2" in resumed.stdout
    assert "epoch 1:" not in resumed.stderr and "epoch 2:" in resumed.stderr
    # The same two ranks, the same shards and seeds: exactly the weights of the uninterrupted run.
    a, b = load_file(work / "out" / "model.safetensors"), load_file(clean / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_another_machine_joins_with_torchrun_by_hand_and_the_launching_machine_writes(images, two_ranks, tmp_path):
    """Two "machines" on localhost (nnodes 2, one rank each): on the first the stage as DVC runs it, on the second
    the README's torchrun command. The second starts first, so it gets rank 0 (c10d numbers the machines by host
    name, then by process id); the first machine's rank still writes the checkpoint and the outputs, where DVC
    expects them, and the second writes nothing."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    endpoint, settings = f"localhost:{port}", "nproc_per_node: 1\n    nnodes: 2\n    rdzv_id: two-machines"
    torchrun = f"  engine: torchrun\n  torchrun:\n    {settings}\n    rdzv_endpoint: {endpoint}\n"
    first, second = _setup(tmp_path / "first", images, torchrun), _setup(tmp_path / "second", images, torchrun)
    by_hand = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--nnodes", "2"]
    by_hand += ["--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-machines"]
    joining = subprocess.Popen(
        _stage(second, images, by_hand), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    launched = _run(_stage(first, images))
    joined_out, joined_err = joining.communicate(timeout=120)
    assert launched.returncode == 0, launched.stderr
    assert joining.returncode == 0, joined_err
    assert "finetune: 3 epochs" in launched.stdout and "finetune:" not in joined_out
    assert "epoch 3:" in joined_err and "checkpoint saved" not in joined_err and "checkpoint saved" in launched.stderr
    assert {p.name for p in second.iterdir()} == {"manifest.csv", "init.safetensors", "params.yaml"}
    # One intra-op thread per rank on one machine, two here (torchrun sets OMP_NUM_THREADS for several ranks
    # a machine only): the last bits may differ, as between one process and two ranks.
    tuned, reference = (
        load_file(first / "out" / "model.safetensors"),
        load_file(two_ranks[0] / "out" / "model.safetensors"),
    )
    assert _max_difference(tuned, reference) < ATOL


def test_the_run_key_depends_on_the_world_size_but_not_on_how_the_ranks_are_started(images, tmp_path):
    manifest = read_manifest(prepare_manifest(images, tmp_path / "manifest.csv"))
    backbone, layer = build_backbone(BACKBONE), torch.nn.Linear(4, 2)
    params = FinetuneParams(init_head="random", device="cpu", batch_size=48)
    key = run_key(backbone, params, manifest, layer)
    launched = replace(params, engine="torchrun", torchrun=TorchrunParams(3, 2, "host:1234", "other"))
    assert run_key(backbone, launched, manifest, layer) == key
    assert run_key(backbone, launched, manifest, layer, world=6) != key
    assert run_key(backbone, params, manifest, layer, world=2) != run_key(backbone, params, manifest, layer, world=4)


def test_torchrun_is_given_the_rendezvous_only_for_several_machines():
    one = torchrun_args(TorchrunParams(nproc_per_node=4), "stages.finetune", ["--data", "d"])
    assert one == ["--nproc_per_node", "4", "--nnodes", "1", "--standalone", "-m", "stages.finetune", "--data", "d"]
    two = torchrun_args(TorchrunParams(2, 3, "gpu1:29400", "run-7"), "stages.finetune", [])
    assert two[:4] == ["--nproc_per_node", "2", "--nnodes", "3"]
    assert two[4:10] == ["--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu1:29400", "--rdzv_id", "run-7"]
