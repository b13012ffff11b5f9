"""Typed wrappers for torch.ops.tpext.* and their fake (meta) kernels.

Each wrapper takes a group (ProcessGroup, 1-D DeviceMesh or None) and forwards its registered name to
the op; each fake kernel sits right below its wrapper so torch.compile and FakeTensor can trace the op
without running it. The schemas live in csrc/torch_bindings.cpp.

``chunks`` (int or "auto") and ``algorithm`` (a ``tpext.planner.Algorithm``, its int, or "auto") form
the plan; ``tpext.planner.resolve_plan`` fills in the "auto" parts from the rows of the GEMM output, the
group size and the device.
"""

from __future__ import annotations

import atexit
import math
from typing import Optional, Union

import torch
from torch import Tensor

from tpext import _C
from tpext.distributed import GroupLike, group_name, group_size, resolve_group
from tpext.planner import AlgorithmLike, resolve_plan

__all__ = ["gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm", "set_nccl_options", "nccl_options",
           "nccl_comm_info"]

Chunks = Union[int, str]


def _plan(chunks: Chunks, algorithm: AlgorithmLike, out_rows: int, group: GroupLike, device: torch.device):
    chunks, algorithm = resolve_plan(chunks, algorithm, out_rows, resolve_group(group).size(), device.type)
    return chunks, int(algorithm)


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def gemm_all_reduce(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                    chunks: Chunks = 1, algorithm: AlgorithmLike = "auto",
                    residual: Optional[Tensor] = None) -> Tensor:
    """``all_reduce(x @ w.T) + bias + residual`` with the GEMM split into `chunks` row chunks that overlap
    the all-reduce. x: [*, K], w: [N, K], bias: [N], residual: [*, N] (both added once, after the
    reduction) -> [*, N]."""
    plan = _plan(chunks, algorithm, _rows(x), group, x.device)
    return torch.ops.tpext.gemm_all_reduce(x, w, bias, group_name(group), *plan, residual)


@torch.library.register_fake("tpext::gemm_all_reduce")
def _(x, w, bias, group_name, chunks, algorithm=1, residual=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def gemm_reduce_scatter(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                        chunks: Chunks = 1, algorithm: AlgorithmLike = "auto",
                        residual: Optional[Tensor] = None) -> Tensor:
    """This rank's dim-0 block of ``reduce_scatter(x @ w.T) + bias + residual``.
    x: [M, *, K] with M divisible by R, w: [N, K], bias: [N], residual: [M/R, *, N] -> [M/R, *, N]."""
    plan = _plan(chunks, algorithm, _rows(x), group, x.device)
    return torch.ops.tpext.gemm_reduce_scatter(x, w, bias, group_name(group), *plan, residual)


@torch.library.register_fake("tpext::gemm_reduce_scatter")
def _(x, w, bias, group_name, chunks, algorithm=1, residual=None):
    world = group_size(group_name)
    torch._check(
        x.shape[0] % world == 0,
        lambda: f"tpext.gemm_reduce_scatter: x.size(0) = {x.shape[0]} must be divisible by the group size {world}",
    )
    return x.new_empty((x.shape[0] // world, *x.shape[1:-1], w.shape[0]))


def all_gather_gemm(x_shard: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                    chunks: Chunks = 1, algorithm: AlgorithmLike = "auto") -> tuple[Tensor, Tensor]:
    """``(all_gather(x_shard) @ w.T + bias, all_gather(x_shard))``, gathers overlapped with the GEMM.
    x_shard: [m, *, K], w: [N, K], bias: [N] -> ([R*m, *, N], [R*m, *, K]). The gathered input is
    returned for the weight gradient; drop it to save memory and re-gather in backward."""
    plan = _plan(chunks, algorithm, _rows(x_shard) * resolve_group(group).size(), group, x_shard.device)
    return torch.ops.tpext.all_gather_gemm(x_shard, w, bias, group_name(group), *plan)


@torch.library.register_fake("tpext::all_gather_gemm")
def _(x_shard, w, bias, group_name, chunks, algorithm=1):
    rows = x_shard.shape[0] * group_size(group_name)
    mid = tuple(x_shard.shape[1:-1])
    return x_shard.new_empty((rows, *mid, w.shape[0])), x_shard.new_empty((rows, *mid, x_shard.shape[-1]))


def _require_cuda_build(what: str) -> None:
    if not _C.cuda_compiled:
        raise RuntimeError(f"tpext.ops.{what}: this tpext build has no CUDA support (built against a CPU torch "
                           "or with TPEXT_FORCE_CPU=1); the NCCL communicator exists only in CUDA builds")


def set_nccl_options(group: GroupLike = None, *, max_ctas: int = 0, cga_cluster_size: int = 0,
                     local_fast_path: bool = True) -> None:
    """Options of tpext's NCCL communicator for `group` (CUDA tensors). Call on every rank with the same
    values, before the ops (a changed setting drops the cached communicator; the next op re-creates it).

    max_ctas: most SMs (CTAs) one NCCL kernel of this group occupies, so the overlapped GEMM keeps the
    rest (ncclConfig_t.maxCTAs; 0 = NCCL's default). cga_cluster_size: ncclConfig_t.cgaClusterSize
    (0 = default). local_fast_path=False sends a group of one through the real NCCL path (tests).
    """
    _require_cuda_build("set_nccl_options")
    _C._set_nccl_options(group_name(group), int(max_ctas), int(cga_cluster_size), bool(local_fast_path))


def nccl_options(group: GroupLike = None) -> dict:
    """The options set for `group` (defaults if none were)."""
    _require_cuda_build("nccl_options")
    return _C._nccl_options(group_name(group))


def nccl_comm_info(group: GroupLike = None) -> dict:
    """Whether `group`'s NCCL communicator exists, and its rank, size, device and creation options."""
    _require_cuda_build("nccl_comm_info")
    return _C._nccl_comm_info(group_name(group))


if _C.cuda_compiled:
    # NCCL communicators are finalized while the CUDA runtime is still alive (not at static destruction).
    atexit.register(_C._destroy_nccl_communicators)
