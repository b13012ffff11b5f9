"""Typed wrappers for torch.ops.tpext.* and their fake (meta) kernels.

Each wrapper takes a group (ProcessGroup, 1-D DeviceMesh or None) and forwards its registered name to
the op; each fake kernel sits right below its wrapper so torch.compile and FakeTensor can trace the op
without running it. The schemas live in csrc/torch_bindings.cpp.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tpext.distributed import GroupLike, group_name, group_size

__all__ = ["gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm"]


def gemm_all_reduce(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                    chunks: int = 1) -> Tensor:
    """``all_reduce(x @ w.T) + bias`` with the GEMM split into `chunks` row chunks that overlap the
    all-reduce. x: [*, K], w: [N, K], bias: [N] (added once, after the reduction) -> [*, N]."""
    return torch.ops.tpext.gemm_all_reduce(x, w, bias, group_name(group), chunks)


@torch.library.register_fake("tpext::gemm_all_reduce")
def _(x, w, bias, group_name, chunks):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def gemm_reduce_scatter(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                        chunks: int = 1) -> Tensor:
    """This rank's dim-0 block of ``reduce_scatter(x @ w.T) + bias``.
    x: [M, *, K] with M divisible by R, w: [N, K], bias: [N] -> [M/R, *, N]."""
    return torch.ops.tpext.gemm_reduce_scatter(x, w, bias, group_name(group), chunks)


@torch.library.register_fake("tpext::gemm_reduce_scatter")
def _(x, w, bias, group_name, chunks):
    world = group_size(group_name)
    torch._check(
        x.shape[0] % world == 0,
        lambda: f"tpext.gemm_reduce_scatter: x.size(0) = {x.shape[0]} must be divisible by the group size {world}",
    )
    return x.new_empty((x.shape[0] // world, *x.shape[1:-1], w.shape[0]))


def all_gather_gemm(x_shard: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                    chunks: int = 1) -> tuple[Tensor, Tensor]:
    """``(all_gather(x_shard) @ w.T + bias, all_gather(x_shard))``, gathers overlapped with the GEMM.
    x_shard: [m, *, K], w: [N, K], bias: [N] -> ([R*m, *, N], [R*m, *, K]). The gathered input is
    returned for the weight gradient; drop it to save memory and re-gather in backward."""
    return torch.ops.tpext.all_gather_gemm(x_shard, w, bias, group_name(group), chunks)


@torch.library.register_fake("tpext::all_gather_gemm")
def _(x_shard, w, bias, group_name, chunks):
    rows = x_shard.shape[0] * group_size(group_name)
    mid = tuple(x_shard.shape[1:-1])
    return x_shard.new_empty((rows, *mid, w.shape[0])), x_shard.new_empty((rows, *mid, x_shard.shape[-1]))
