"""Data-parallel fine-tuning: torchrun's processes (ranks), their process group, and the little they exchange.

A rank learns who it is from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK). The stage either runs under a
torchrun the user started (how other machines join), or starts torchrun itself in-process (`finetune.engine:
torchrun`, so `dvc repro` stays the command). gloo on CPU, NCCL on CUDA, one GPU per rank.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.config import TorchrunParams
from pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

# Set by `launch` for the ranks it starts: they run on the machine where the stage (DVC) runs, which must get the
# outputs. torchrun's c10d rendezvous numbers machines in the order of their host names, not the launcher first.
LAUNCHED_HERE = "TRANSFER_FINETUNE_LAUNCHED_HERE"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class LaunchError(PipelineError):
    """torchrun could not start the ranks, or one of them failed."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks; one process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # rank on this machine: the GPU it uses
    writer: int = 0  # the rank that reads and writes files (checkpoints, outputs)
    # This rank runs on the machine where the stage (DVC) runs, which must get the outputs: `launch` started it.
    launched_here: bool = True

    @property
    def writes(self) -> bool:
        return self.rank == self.writer


SINGLE = Ranks()


def under_torchrun() -> bool:
    """True in a process torchrun started, whatever `finetune.engine` says."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def ranks_from_env() -> Ranks:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK, and whether `launch` started this rank: everything the library
    takes from the environment, read here once (the stage's edge). Rank 0 of 1 outside torchrun."""
    if not under_torchrun():
        return SINGLE
    env = os.environ
    here = env.get(LAUNCHED_HERE) == "1"
    return Ranks(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launched_here=here)


def data_parallel(module: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """The module itself for one process; else DistributedDataParallel around it, which averages the gradients of
    the parameters that require grad. Frozen ones are left out of it, so `unfreeze: 0` (the new layer alone)
    raises no "unused parameters" error."""
    if ranks.world == 1:
        return module
    # No buffer broadcast every step: the writer's BatchNorm statistics are sent once an epoch, before validation.
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
    )


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[Ranks]:
    """The ranks joined in a process group (gloo on CPU, NCCL on CUDA) for the block; `ranks` with its writer
    elected. One process needs none: `ranks` as it is."""
    if ranks.world == 1:
        yield ranks
        return
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        yield replace(ranks, writer=elect_writer(ranks, device))
    finally:
        dist.destroy_process_group()


def elect_writer(ranks: Ranks, device: torch.device) -> int:
    """Local rank 0 of the machine `launch` ran on (where DVC expects the outputs); rank 0 when every machine was
    started by hand."""
    here = ranks.launched_here and ranks.local_rank == 0
    candidate = torch.tensor([ranks.rank if here else ranks.world], dtype=torch.int64, device=device)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN)
    return int(candidate) % ranks.world  # no candidate: world % world, rank 0


def all_reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks (float64: counts stay exact), the same on every rank."""
    total = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def broadcast_bytes(data: bytes | None, src: int, device: torch.device) -> bytes | None:
    """`data` of rank `src` on every rank (None stays None): a checkpoint read on one machine resumes all of
    them, with or without a shared disk. Plain bytes in a uint8 tensor: nothing is pickled."""
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if int(size) < 0:
        return None
    buffer = torch.empty(int(size), dtype=torch.uint8, device=device)
    if data:  # torch.frombuffer refuses an empty buffer
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src)
    return buffer.cpu().numpy().tobytes()


def broadcast_buffers(module: torch.nn.Module, src: int) -> None:
    """The buffers (BatchNorm statistics) of rank `src` on every rank: under `batchnorm: train` each rank's last
    batch moved its own, and validation must score the weights that are saved."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src)


def die_with_launcher() -> None:
    """Ask Linux to SIGKILL this rank when its parent, torchrun's agent, dies.

    torchrun starts every rank in a session of its own, so a SIGKILL of the launcher (or of its process group)
    would leave the ranks training, and writing the checkpoint that the rerun resumes from. (PR_SET_PDEATHSIG
    fires when the thread that started the rank ends: torchrun's agent starts them from its main thread.)
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("finetune: this rank will outlive a killed torchrun (prctl: %s)", os.strerror(ctypes.get_errno()))
    elif os.getppid() != parent:  # the launcher died before the request was in place: nothing will kill us
        os._exit(1)


def torchrun_args(params: TorchrunParams, module: str, argv: Sequence[str]) -> list[str]:
    """torchrun's command line for `python -m module argv` on every rank: on one machine `--standalone` (a free
    local port, nothing to configure); on several, the c10d rendezvous every machine gives the same flags."""
    flags = ["--nproc_per_node", str(params.nproc_per_node), "--nnodes", str(params.nnodes)]
    if params.nnodes == 1:
        flags.append("--standalone")
    else:
        flags += ["--rdzv_backend", "c10d", "--rdzv_endpoint", params.rdzv_endpoint, "--rdzv_id", params.rdzv_id]
    return [*flags, "-m", module, *argv]


def launch(params: TorchrunParams, module: str, argv: Sequence[str]) -> None:
    """Run `python -m module argv` as torchrun's ranks, in this process (torchrun's own agent), until they end.
    A failed rank is a one-line error; its own error is printed above it."""
    # Imported here: only the launching process runs torchrun's agent.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(params, module, argv))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    os.environ[LAUNCHED_HERE] = "1"  # the ranks inherit it
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise LaunchError(
            f"finetune: rank {rank} (local rank {failure.local_rank} on this machine) failed with {how}, its "
            "error above; a rerun resumes from the checkpoint of the last finished epoch, if there is one"
        ) from err
    except SignalException as err:  # torchrun stopped its ranks before it re-raised
        raise LaunchError(
            f"finetune: stopped by {err.sigval.name} (torchrun stopped its ranks); a rerun resumes from the "
            "checkpoint of the last finished epoch, if there is one"
        ) from err
    except RendezvousError as err:
        raise LaunchError(f"finetune: torchrun could not gather the ranks: {err}") from err
    finally:
        del os.environ[LAUNCHED_HERE]
