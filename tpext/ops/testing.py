"""Fake kernels and a Python driver for the test-only ops, torch.ops.tpext_testing.* (schemas in
csrc/testing_bindings.cpp). Not public API: the tests use them to run the real kernels and schedules of
R ranks in one process (virtual ranks), on one GPU or on CPU without spawning processes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["run_on_virtual_ranks"]


def run_on_virtual_ranks(
    op: str,
    xs: Sequence[Tensor],
    ws: Sequence[Tensor],
    biases: Sequence[Tensor] = (),
    residuals: Sequence[Tensor] = (),
    chunks: int = 1,
    algorithm: int = 1,
) -> list[tuple[Tensor, ...]]:
    """`op` ("gemm_all_reduce", "gemm_reduce_scatter" or "all_gather_gemm") on len(xs) virtual ranks, one
    thread (and CUDA stream) each: rank r gets xs[r], ws[r], biases[r], residuals[r] (empty: none).
    Returns each rank's outputs as a tuple (y,), or (y, x_full) for all_gather_gemm."""
    flat = torch.ops.tpext_testing.run_on_virtual_ranks(
        op, list(xs), list(ws), list(biases), list(residuals), int(chunks), int(algorithm)
    )
    per_rank = len(flat) // len(xs)
    return [tuple(flat[r * per_rank : (r + 1) * per_rank]) for r in range(len(xs))]


@torch.library.register_fake("tpext_testing::p2p_virtual_all_reduce")
def _(xs, algorithm):
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


@torch.library.register_fake("tpext_testing::p2p_virtual_reduce_scatter")
def _(xs):
    return [x.new_empty((x.shape[0] // len(xs), *x.shape[1:])) for x in xs]


@torch.library.register_fake("tpext_testing::p2p_virtual_all_gather")
def _(xs):
    return [x.new_empty((x.shape[0] * len(xs), *x.shape[1:])) for x in xs]


@torch.library.register_fake("tpext_testing::p2p_virtual_all_reduce_residual_rmsnorm")
def _(xs, residual: Tensor | None, bias: Tensor | None, weight, eps):
    like = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]
    return like, [torch.empty_like(x) for x in like]
