"""Typed wrappers for torch.ops.tpext.* and their fake (meta) kernels.

Each wrapper takes a group (ProcessGroup, 1-D DeviceMesh or None) and forwards its registered name to
the op; each fake kernel sits right below its wrapper so torch.compile and FakeTensor can trace the op
without running it. The schemas live in csrc/torch_bindings.cpp.

``chunks`` (int or "auto") and ``algorithm`` (a ``tpext.planner.Algorithm``, its int, or "auto") form
the plan; ``tpext.planner.resolve_schedule`` fills in the "auto" parts from the rows of the GEMM output, the
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
from tpext.planner import AlgorithmLike, resolve_schedule

__all__ = [
    "gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm", "set_nccl_options", "nccl_options", "nccl_comm_info",
    "destroy_nccl_communicators", "abort_nccl_communicators",
    "p2p_all_reduce", "p2p_reduce_scatter", "p2p_all_gather", "p2p_all_reduce_residual_rmsnorm",
]

Chunks = Union[int, str]


def _plan(chunks: Chunks, algorithm: AlgorithmLike, out_rows: int, group: GroupLike, width: int, like: Tensor):
    """The schedule for `out_rows` rows whose collective moves `width` elements of like's dtype per row."""
    chunks, algorithm = resolve_schedule(chunks, algorithm, out_rows, resolve_group(group).size(),
                                         like.device.type, width * like.element_size())
    return chunks, int(algorithm)


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def gemm_all_reduce(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                    chunks: Chunks = 1, algorithm: AlgorithmLike = "auto",
                    residual: Optional[Tensor] = None) -> Tensor:
    """``all_reduce(x @ w.T) + bias + residual`` with the GEMM split into `chunks` row chunks that overlap
    the all-reduce. x: [*, K], w: [N, K], bias: [N], residual: [*, N] (both added once, after the
    reduction) -> [*, N]."""
    plan = _plan(chunks, algorithm, _rows(x), group, w.shape[0], x)  # all-reduces [M, N]
    return torch.ops.tpext.gemm_all_reduce(x, w, bias, group_name(group), *plan, residual)


@torch.library.register_fake("tpext::gemm_all_reduce")
def _(x, w, bias, group_name, chunks, algorithm=1, residual=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def gemm_reduce_scatter(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, group: GroupLike = None,
                        chunks: Chunks = 1, algorithm: AlgorithmLike = "auto",
                        residual: Optional[Tensor] = None) -> Tensor:
    """This rank's dim-0 block of ``reduce_scatter(x @ w.T) + bias + residual``.
    x: [M, *, K] with M divisible by R, w: [N, K], bias: [N], residual: [M/R, *, N] -> [M/R, *, N]."""
    plan = _plan(chunks, algorithm, _rows(x), group, w.shape[0], x)  # reduce-scatters [M, N]
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
    plan = _plan(chunks, algorithm, _rows(x_shard) * resolve_group(group).size(), group, x_shard.shape[-1],
                 x_shard)  # gathers x
    return torch.ops.tpext.all_gather_gemm(x_shard, w, bias, group_name(group), *plan)


@torch.library.register_fake("tpext::all_gather_gemm")
def _(x_shard, w, bias, group_name, chunks, algorithm=1):
    rows = x_shard.shape[0] * group_size(group_name)
    mid = tuple(x_shard.shape[1:-1])
    return x_shard.new_empty((rows, *mid, w.shape[0])), x_shard.new_empty((rows, *mid, x_shard.shape[-1]))


# ---- P2P ops (algorithm: 0 = the group's collective, 1 = one-shot, 2 = two-shot; see tpext/p2p.py) ----

def p2p_all_reduce(x: Tensor, group: GroupLike = None, algorithm: int = 1) -> Tensor:
    """Sum of x over the group (fp32 accumulation in rank order on the P2P path). x: [*] -> [*]."""
    return torch.ops.tpext.p2p_all_reduce(x, group_name(group), algorithm)


@torch.library.register_fake("tpext::p2p_all_reduce")
def _(x, group_name, algorithm):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def p2p_reduce_scatter(x: Tensor, group: GroupLike = None, algorithm: int = 1) -> Tensor:
    """This rank's dim-0 block of the sum over the group. x: [R*m, *] -> [m, *]."""
    return torch.ops.tpext.p2p_reduce_scatter(x, group_name(group), algorithm)


@torch.library.register_fake("tpext::p2p_reduce_scatter")
def _(x, group_name, algorithm):
    world = group_size(group_name)
    torch._check(x.dim() >= 1 and x.shape[0] % world == 0,
                 lambda: f"tpext.p2p_reduce_scatter: x.size(0) must be divisible by the group size {world}")
    return x.new_empty((x.shape[0] // world, *x.shape[1:]))


def p2p_all_gather(x: Tensor, group: GroupLike = None, algorithm: int = 1) -> Tensor:
    """Every rank's x stacked along dim 0. x: [m, *] -> [R*m, *]."""
    return torch.ops.tpext.p2p_all_gather(x, group_name(group), algorithm)


@torch.library.register_fake("tpext::p2p_all_gather")
def _(x, group_name, algorithm):
    return x.new_empty((x.shape[0] * group_size(group_name), *x.shape[1:]))


def p2p_all_reduce_residual_rmsnorm(x: Tensor, residual: Optional[Tensor], weight: Tensor,
                                    bias: Optional[Tensor] = None, eps: float = 1e-6, group: GroupLike = None,
                                    algorithm: int = 1) -> tuple[Tensor, Tensor]:
    """(rms_norm(h) * weight, h) with h = all_reduce(x) + bias + residual. x, residual: [*, H]; weight,
    bias: [H]. Forward only; tpext.nn.functional.all_reduce_residual_rmsnorm is differentiable."""
    return torch.ops.tpext.p2p_all_reduce_residual_rmsnorm(x, residual, bias, weight, eps, group_name(group),
                                                           algorithm)


@torch.library.register_fake("tpext::p2p_all_reduce_residual_rmsnorm")
def _(x, residual, bias, weight, eps, group_name, algorithm):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.register_fake("tpext::p2p_rmsnorm_backward")
def _(grad_out, grad_residual, h, weight, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight)


@torch.library.register_fake("tpext::p2p_virtual_all_reduce")
def _(xs, algorithm):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


@torch.library.register_fake("tpext::p2p_virtual_reduce_scatter")
def _(xs):
    return [x.new_empty((x.shape[0] // len(xs), *x.shape[1:])) for x in xs]


@torch.library.register_fake("tpext::p2p_virtual_all_gather")
def _(xs):
    return [x.new_empty((x.shape[0] * len(xs), *x.shape[1:])) for x in xs]


@torch.library.register_fake("tpext::p2p_virtual_all_reduce_residual_rmsnorm")
def _(xs, residual, bias, weight, eps):
    like = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]
    return like, [torch.empty_like(x) for x in like]


def _require_cuda_build(what: str) -> None:
    if not _C.cuda_compiled:
        raise RuntimeError(f"tpext.ops.{what}: this tpext build has no CUDA support (built against a CPU torch "
                           "or with TPEXT_FORCE_CPU=1); the NCCL communicator exists only in CUDA builds")


def set_nccl_options(group: GroupLike = None, *, max_ctas: int = 0, cga_cluster_size: int = 0,
                     local_fast_path: bool = True) -> None:
    """Options of tpext's NCCL communicator for `group` (CUDA tensors). Call on every rank with the same
    values, before the ops (a changed setting drops the cached communicator; the next op re-creates it).

    max_ctas: most CTAs (NCCL channels, hence SMs) one NCCL kernel of this group launches, so the
    overlapped GEMM keeps the rest (ncclConfig_t.maxCTAs; 0 = NCCL's default). cga_cluster_size:
    ncclConfig_t.cgaClusterSize (0 = default). local_fast_path=False sends a group of one through the
    real NCCL path (tests).
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


def destroy_nccl_communicators() -> None:
    """Finalize and destroy every NCCL communicator tpext made (all groups). Finalize waits for the
    peers to finalize too; a communicator with an asynchronous NCCL error is aborted instead. Runs at
    exit; the next op on a group creates a new communicator (collectively). A no-op in a CPU build."""
    if _C.cuda_compiled:
        _C._destroy_nccl_communicators()


def abort_nccl_communicators() -> None:
    """Abort every NCCL communicator tpext made (ncclCommAbort): never waits for peers and drops the
    collectives still queued. Call it when a peer failed or the group is given up (e.g. in an exception
    handler before exiting), where `destroy_nccl_communicators` would wait for the gone peer. The next
    op on a group creates a new communicator (collectively). A no-op in a CPU build.

    Example:
        >>> try:
        ...     train_step()
        ... except Exception:
        ...     tpext.ops.abort_nccl_communicators()
        ...     raise
    """
    if _C.cuda_compiled:
        _C._abort_nccl_communicators()


if _C.cuda_compiled:
    # NCCL communicators are finalized while the CUDA runtime is still alive (not at static destruction).
    atexit.register(_C._destroy_nccl_communicators)
