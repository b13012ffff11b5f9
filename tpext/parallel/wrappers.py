"""Checks at forward that the data-parallel wrapper around a parallelized model fits its tensor-parallel group.

DistributedDataParallel and FSDP2's fully_shard treat each parameter as one tensor held alike (DDP) or split
(FSDP2) across their ranks. Over a group that holds two ranks of one tensor-parallel group they would
broadcast one rank's shards over the others', average different shards' gradients, or gather pieces of
different shards into one weight: lost shards and wrong gradients, never an error of their own. tpext checks
the wrapper's group at forward and refuses such a wrapper with a ValueError naming it and the way out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from tpext.distributed import SharesGroupOnCopy

__all__ = ["check_data_parallel_wrappers"]

_WAY_OUT = (
    "wrap it over the data-parallel group only: parallelize over mesh['tp'] of a 2-D DeviceMesh ('dp', 'tp') "
    "and wrap over mesh['dp'] (DistributedDataParallel(model, process_group=mesh['dp'].get_group()), "
    "fully_shard(model, mesh=mesh['dp'])); with one data-parallel replica (tp = the world size) use no "
    "data-parallel wrapper"
)


def _fsdp_mesh(model: nn.Module):
    """The device mesh FSDP2's fully_shard shards `model`'s parameters over (of its first sharded module), or
    None. Read from fully_shard's state: at forward its parameters are already gathered, plain tensors."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            try:
                return fully_shard.state(module)._fsdp_param_group.mesh_info.mesh
            except AttributeError:  # a module with no parameters of its own (no param group)
                continue
    return None


def _active_ddp() -> DistributedDataParallel | None:
    """The DistributedDataParallel whose forward is running now (torch keeps it for torch.compile), if any."""
    active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return active() if callable(active) else None


class _WrapperCheck(SharesGroupOnCopy):
    """Forward pre-hook of a parallelized model: the DDP whose forward calls it, and the device mesh of its
    FSDP2-sharded parameters, may hold at most one rank of its tensor-parallel group (this one). Each DDP is
    checked at its first forward, FSDP2's mesh at the first forward after fully_shard(model)."""

    def __init__(self, group, name: str):
        self.group, self.name = group, name
        self.tp_ranks = frozenset(dist.get_process_group_ranks(group))
        self._ddp_checked: int | None = None
        self._fsdp_checked = False

    def _refuse(self, wrapper: str, ranks: list[int], what: str) -> None:
        shared = sorted(self.tp_ranks.intersection(ranks))
        if len(shared) > 1:
            raise ValueError(
                f"tpext.parallelize: {self.name} is wrapped in {wrapper} over ranks {sorted(ranks)}, which holds "
                f"ranks {shared} of its tensor-parallel group {sorted(self.tp_ranks)}; each of those holds its "
                f"own shards, which {wrapper} {what}; {_WAY_OUT}"
            )

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        ddp = _active_ddp()
        if (
            ddp is not None
            and id(ddp) != self._ddp_checked
            and any(m is module for m in ddp.module.modules())
        ):
            self._refuse(
                "DistributedDataParallel",
                dist.get_process_group_ranks(ddp.process_group),
                "took for one tensor: it broadcast one rank's parameters over the others' when it was built "
                "(those shards are lost: parallelize the model again) and averages their gradients",
            )
            self._ddp_checked = id(ddp)
        if not self._fsdp_checked and isinstance(module, FSDPModule):  # fully_shard(model) on the root too
            self._fsdp_checked = True
            mesh = _fsdp_mesh(module)
            if mesh is not None:
                self._refuse(
                    "FSDP2's fully_shard",
                    mesh.mesh.flatten().tolist(),
                    "splits and gathers as pieces of one tensor, mixing different ranks' shards into one weight",
                )


def check_data_parallel_wrappers(model: nn.Module, group, name: str) -> None:
    """Check at forward that a DDP or FSDP2 wrapper around `model` (parallelized over `group`) holds no two
    ranks of `group` (`_WrapperCheck`).

    Args:
        model: the parallelized model.
        group: its tensor-parallel ProcessGroup.
        name: what the error calls the model.

    Raises:
        ValueError: at forward, naming the wrapper, its ranks and the tensor-parallel ranks it holds.

    Example:
        >>> tpext.parallelize(model, group=mesh["tp"])   # attaches the check
        >>> DistributedDataParallel(model)(x)            # over every rank: ValueError
    """
    if group.size() > 1:
        model.register_forward_pre_hook(_WrapperCheck(group, name))
