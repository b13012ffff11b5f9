"""The P2P collective ops (schemas in csrc/torch_bindings.cpp, code in csrc/ops/p2p.cpp): one typed
wrapper per op, its fake kernel right below it.

``algorithm`` is a `tpext.p2p.P2PAlgorithm` (or its int): COLLECTIVE (0) = the group's own collective,
ONE_SHOT (1) / TWO_SHOT (2) = tpext's kernels over the group's symmetric buffers (`tpext.p2p.enable`).
The layers choose it with `tpext.p2p.algorithm_for`. With a P2P algorithm, CPU tensors run the kernels'
host reference and CUDA groups without usable buffers fall back to the collective, saying why once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpext.distributed import GroupLike, group_name, group_size

__all__ = ["p2p_all_reduce", "p2p_reduce_scatter", "p2p_all_gather", "p2p_all_reduce_residual_rmsnorm"]


def p2p_all_reduce(x: Tensor, group: GroupLike = None, algorithm: int = 1) -> Tensor:
    """Sum of x over the group; on the P2P path in rank order with fp32 accumulation (fp64 for fp64), so
    every rank gets the same bits.

    Args:
        x: [*], float32, float16, bfloat16 or float64.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        algorithm: a `tpext.p2p.P2PAlgorithm` (default ONE_SHOT).

    Returns:
        [*], contiguous.

    Raises:
        RuntimeError: unsupported dtype or algorithm, or the group's P2P kernels were aborted.

    Example:
        >>> y = tpext.ops.p2p_all_reduce(x, algorithm=tpext.p2p.P2PAlgorithm.ONE_SHOT)
    """
    return torch.ops.tpext.p2p_all_reduce(x, group_name(group), int(algorithm))


@torch.library.register_fake("tpext::p2p_all_reduce")
def _(x, group_name, algorithm):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def p2p_reduce_scatter(x: Tensor, group: GroupLike = None, algorithm: int = 1) -> Tensor:
    """This rank's dim-0 block of the sum over the group.

    Args:
        x: [R*m, *]; group, algorithm: as for `p2p_all_reduce`.

    Returns:
        [m, *].

    Raises:
        RuntimeError: x.size(0) is not divisible by the group size, or as for `p2p_all_reduce`.

    Example:
        >>> tpext.p2p.enable()  # once per group, on CUDA
        >>> y_block = tpext.ops.p2p_reduce_scatter(x)  # [M/R, *]
    """
    return torch.ops.tpext.p2p_reduce_scatter(x, group_name(group), int(algorithm))


@torch.library.register_fake("tpext::p2p_reduce_scatter")
def _(x, group_name, algorithm):
    world = group_size(group_name)
    torch._check(
        x.dim() >= 1 and x.shape[0] % world == 0,
        lambda: f"tpext.p2p_reduce_scatter: x.size(0) must be divisible by the group size {world}",
    )
    return x.new_empty((x.shape[0] // world, *x.shape[1:]))


def p2p_all_gather(x: Tensor, group: GroupLike = None, algorithm: int = 1) -> Tensor:
    """Every rank's x stacked along dim 0.

    Args:
        x: [m, *]; group, algorithm: as for `p2p_all_reduce`.

    Returns:
        [R*m, *].

    Raises:
        RuntimeError: as for `p2p_all_reduce`.

    Example:
        >>> x_full = tpext.ops.p2p_all_gather(x_shard)  # [R * M, *], after tpext.p2p.enable()
    """
    return torch.ops.tpext.p2p_all_gather(x, group_name(group), int(algorithm))


@torch.library.register_fake("tpext::p2p_all_gather")
def _(x, group_name, algorithm):
    return x.new_empty((x.shape[0] * group_size(group_name), *x.shape[1:]))


def p2p_all_reduce_residual_rmsnorm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    group: GroupLike = None,
    algorithm: int = 1,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(h) * weight, h)`` with ``h = all_reduce(x) + bias + residual``, in one fused pass on
    the P2P path (the decode epilogue). Forward only: `tpext.nn.functional.all_reduce_residual_rmsnorm`
    is the differentiable form.

    Args:
        x: [*, H], this rank's partial sum.
        residual: [*, H] or None.
        weight: [H], the norm's weight; bias: [H] or None.
        eps: the norm's epsilon (> 0).
        group, algorithm: as for `p2p_all_reduce` (the fused kernel is one-shot for either P2P value).

    Returns:
        (out, h), both [*, H] and the same bits on every rank; h is the new residual stream.

    Raises:
        RuntimeError: a shape or dtype does not fit (the message names the argument), or as for
            `p2p_all_reduce`.

    Example:
        >>> out, residual = tpext.ops.p2p_all_reduce_residual_rmsnorm(o_partial, residual, norm.weight)
    """
    return torch.ops.tpext.p2p_all_reduce_residual_rmsnorm(
        x, residual, bias, weight, eps, group_name(group), int(algorithm)
    )


@torch.library.register_fake("tpext::p2p_all_reduce_residual_rmsnorm")
def _(x, residual, bias, weight, eps, group_name, algorithm):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("tpext::p2p_rmsnorm_backward")
def _(grad_out, grad_residual, h, weight, eps):
    return torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(weight)
