"""Start N local ranks for a tpext command, through torch.distributed's own elastic launcher.

`launch(fn, nproc, *args)` runs ``fn(*args)`` on `nproc` worker processes of this machine exactly as
``torchrun --standalone --nproc-per-node N`` would (c10d rendezvous on localhost, RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT in each worker's environment) and returns {rank: return value}.
When the current process is already one rank of a torchrun job, commands call `fn` directly instead
(`launched_by_torchrun()`), so ``torchrun --nproc-per-node 4 -m tpext demo`` works as well.

Inside a worker, `init_worker()` creates the default process group: NCCL with one GPU per local rank
when CUDA devices are visible, gloo on CPU otherwise.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["launch", "launched_by_torchrun", "init_worker", "default_backend"]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launch(fn: Callable[..., Any], nproc: int, *args: Any, max_restarts: int = 0) -> dict[int, Any]:
    """Run fn(*args) on nproc local ranks; return {global rank: fn's return value}.

    fn must be a module-level function (workers are spawned and import it). A failing rank raises
    torch's ChildFailedError here, with that rank's traceback, after the others have been stopped.
    """
    if nproc < 1:
        raise ValueError(f"tpext.commands.launch: nproc must be >= 1, got {nproc}")
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"tpext-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # what `torchrun --standalone` uses
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(config, fn)(*args)


def init_worker(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Create the default process group from the launcher's environment; return (rank, world size).

    With NCCL each rank uses GPU LOCAL_RANK. Ranks of a CPU job limit themselves to one intra-op
    thread each, so N ranks on N cores do not oversubscribe them.
    """
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
