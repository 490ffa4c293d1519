"""The launcher's distributed variables, read in this one place, and process-group start-up.

`deepspeed`, `torchrun` and the Slurm launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; with no launcher, main.py runs as a single process on a free loopback port.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    use_cuda: bool
    mlflow_tracking_uri: str | None
    slurm_job_id: str | None
    cpu_threads: int  # torch threads per rank on the CPU: OMP_NUM_THREADS, else the cores shared out

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's device: its GPU (LOCAL_RANK) under CUDA, else the CPU."""
        return torch.device(f"cuda:{self.local_rank}" if self.use_cuda else "cpu")

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def free_port() -> int:
    """A TCP port free on the loopback now (for a single-process run, a test server, a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env() -> DistEnv:
    """Fill in single-process defaults and return the launcher's view of this process."""
    env = os.environ
    if "RANK" not in env:
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    world_size = int(env["WORLD_SIZE"])
    # MosaicML streaming reads LOCAL_WORLD_SIZE to tell nodes apart; the deepspeed launcher sets LOCAL_SIZE.
    local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world_size)
    env["LOCAL_WORLD_SIZE"] = str(local_world)
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    cores = len(os.sched_getaffinity(0))
    threads = int(env.get("OMP_NUM_THREADS") or 0) or max(1, cores // local_world)
    return DistEnv(rank=int(env["RANK"]), world_size=world_size, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world_size=local_world, use_cuda=use_cuda,
                   mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI"), slurm_job_id=env.get("SLURM_JOB_ID"),
                   cpu_threads=threads)


def init_process_group(dist_env: DistEnv) -> None:
    import deepspeed

    if dist_env.use_cuda:
        torch.cuda.set_device(dist_env.local_rank)
    else:
        # On the CPU, DeepSpeed's backend JIT-builds a C++ shared-memory op (deepspeed_shm_comm) the first time
        # it starts in an environment: a compiler run of 30-80 s on 2 cores, repeated for every new venv, for an
        # op only its tensor-parallel *inference* all-reduce uses. Training's collectives go through gloo either
        # way, so mark the op unavailable (DeepSpeed keeps this probe's dict and honours edits to it): nothing
        # compiles at start-up, and a killed run leaves none of the op's segments in /dev/shm.
        from deepspeed import ops

        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if dist_env.use_cuda else "gloo")
    global _long_wait_group
    _long_wait_group = torch.distributed.new_group(backend="gloo", timeout=LONG_WAIT)


# Rank 0 alone sometimes works for a long time while the others wait: the stage's export and its upload to
# MLflow (~12 GB for an SDXL-class UNet in fp32), or converting a checkpoint for a new world size. Under the
# default group's collective timeout (NCCL: 10-30 minutes) the waiting ranks would abort, and the ranks that
# left early would let srun's --wait kill rank 0. These waits go through a CPU (gloo) group of their own with
# a long timeout instead; a rank that dies still ends the wait at once (its connections close).
LONG_WAIT = timedelta(hours=12)
_long_wait_group = None


def barrier() -> None:
    torch.distributed.barrier()


def wait_for_all() -> None:
    """A barrier that tolerates one rank working for up to LONG_WAIT before it arrives."""
    torch.distributed.barrier(group=_long_wait_group)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place. `t` must live on this rank's device (CUDA under NCCL)."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t
