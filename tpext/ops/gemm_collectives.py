"""The overlapped GEMM + collective ops (schemas in csrc/torch_bindings.cpp, code in
csrc/ops/gemm_collectives.cpp): one typed wrapper per op, its fake kernel right below it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tpext.distributed import GroupLike, group_name, group_size, resolve_group
from tpext.ops.schedule import AlgorithmLike, Chunks, Schedule, resolve_schedule

__all__ = ["gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm"]


def schedule_for(
    chunks: Chunks, algorithm: AlgorithmLike, out_rows: int, group: GroupLike, width: int, like: Tensor
) -> Schedule:
    """The schedule of an op whose output has `out_rows` rows and whose collective moves `width`
    elements of like's dtype per row ("auto" parts filled in by `resolve_schedule`)."""
    chunks, algorithm = resolve_schedule(
        chunks,
        algorithm,
        out_rows,
        resolve_group(group).size(),
        like.device.type,
        width * like.element_size(),
    )
    return Schedule(chunks, int(algorithm))


def _call(
    op: str, x: Tensor, w: Tensor, bias: Tensor | None, group: GroupLike, chunks, algorithm, *extra
) -> Tensor | tuple[Tensor, Tensor]:
    """torch.ops.tpext.<op> with the group's name and the resolved schedule. The schedule is sized by the
    output's rows (after the gather for all_gather_gemm) and what the collective moves per row: the
    input's K for the gather, the output's N for the reductions."""
    rows = math.prod(x.shape[:-1])
    if op == "all_gather_gemm":
        rows, width = rows * resolve_group(group).size(), x.shape[-1]
    else:
        width = w.shape[0]
    schedule = schedule_for(chunks, algorithm, rows, group, width, x)
    return getattr(torch.ops.tpext, op)(x, w, bias, group_name(group), *schedule, *extra)


def gemm_all_reduce(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    group: GroupLike = None,
    chunks: Chunks = "auto",
    algorithm: AlgorithmLike = "auto",
    residual: Tensor | None = None,
) -> Tensor:
    """``all_reduce(x @ w.T) + bias + residual``, the GEMM split into row chunks whose all-reduce
    overlaps the next chunk's GEMM. The row-parallel forward.

    Args:
        x: [*, K], this rank's input (K is the sharded inner dim).
        w: [N, K], this rank's weight shard (nn.Linear layout).
        bias: [N] or None, added once after the reduction.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        chunks: "auto" (`tpext.ops.auto_schedule`) or an int >= 1; any value gives the same result up to
            rounding, and rows need not divide by it.
        algorithm: "auto", a `tpext.ops.Algorithm` or its int.
        residual: [*, N] or None, added once with the bias.

    Returns:
        [*, N], the same on every rank.

    Raises:
        RuntimeError: a shape, dtype or device does not fit (the message names the argument), raised
            before any collective starts.
        ValueError: `chunks` or `algorithm` is neither "auto" nor an int.

    Example:
        >>> y = tpext.ops.gemm_all_reduce(x, w, bias, chunks=4)  # group=None: the world group
    """
    return _call("gemm_all_reduce", x, w, bias, group, chunks, algorithm, residual)


@torch.library.register_fake("tpext::gemm_all_reduce")
def _(x, w, bias, group_name, chunks, algorithm=1, residual=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def gemm_reduce_scatter(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    group: GroupLike = None,
    chunks: Chunks = "auto",
    algorithm: AlgorithmLike = "auto",
    residual: Tensor | None = None,
) -> Tensor:
    """This rank's dim-0 block of ``reduce_scatter(x @ w.T) + bias + residual``, overlapped as in
    `gemm_all_reduce`. The row-parallel forward with sequence parallelism.

    Args:
        x: [M, *, K] with M divisible by the group size R.
        w: [N, K]; bias: [N] or None; residual: [M/R, *, N] or None (both added once, after the reduction).
        group, chunks, algorithm: as for `gemm_all_reduce`.

    Returns:
        [M/R, *, N]: rows [rank * M/R, (rank + 1) * M/R) of the reduced product.

    Raises:
        RuntimeError: M is not divisible by R, or a shape, dtype or device does not fit.
        ValueError: `chunks` or `algorithm` is neither "auto" nor an int.

    Example:
        >>> y_shard = tpext.ops.gemm_reduce_scatter(x, w, group=tp_group)
    """
    return _call("gemm_reduce_scatter", x, w, bias, group, chunks, algorithm, residual)


@torch.library.register_fake("tpext::gemm_reduce_scatter")
def _(x, w, bias, group_name, chunks, algorithm=1, residual=None):
    world = group_size(group_name)
    torch._check(
        x.shape[0] % world == 0,
        lambda: (
            f"tpext.gemm_reduce_scatter: x.size(0) = {x.shape[0]} must be divisible by the group size {world}"
        ),
    )
    return x.new_empty((x.shape[0] // world, *x.shape[1:-1], w.shape[0]))


def all_gather_gemm(
    x_shard: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    group: GroupLike = None,
    chunks: Chunks = "auto",
    algorithm: AlgorithmLike = "auto",
) -> tuple[Tensor, Tensor]:
    """``(all_gather(x_shard) @ w.T + bias, all_gather(x_shard))``, each gathered chunk's GEMM overlapping
    the next chunk's gather. The column-parallel forward with sequence parallelism.

    Args:
        x_shard: [m, *, K], this rank's sequence shard.
        w: [N, K]; bias: [N] or None.
        group, chunks, algorithm: as for `gemm_all_reduce`.

    Returns:
        (y [R*m, *, N], x_full [R*m, *, K]). x_full is returned for the weight gradient; drop it to save
        memory and re-gather in backward.

    Raises:
        RuntimeError: a shape, dtype or device does not fit (the message names the argument).
        ValueError: `chunks` or `algorithm` is neither "auto" nor an int.

    Example:
        >>> y, x_full = tpext.ops.all_gather_gemm(x_shard, w, group=tp_group)
    """
    return _call("all_gather_gemm", x_shard, w, bias, group, chunks, algorithm)


@torch.library.register_fake("tpext::all_gather_gemm")
def _(x_shard, w, bias, group_name, chunks, algorithm=1):
    rows = x_shard.shape[0] * group_size(group_name)
    mid = tuple(x_shard.shape[1:-1])
    return x_shard.new_empty((rows, *mid, w.shape[0])), x_shard.new_empty((rows, *mid, x_shard.shape[-1]))
