"""Autograd Functions of the parallel linear layers: each forward is an overlapped tpext op and each
backward its dual, overlapped the same way. Shapes: R = tp size, s = tokens (dim 0, flattened with any
further leading dims into M rows), K = in_features, N = out_features; "x @ W.T" as in nn.Linear.
Weight/bias gradients are exact; they are computed locally from the saved or gathered activations.
`schedule` is a tpext.ops.Schedule (chunks, algorithm), used by the forward op and its dual alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tpext import mappings, ops, stats

__all__ = ["ColumnLinear", "ColumnLinearSP", "RowLinear", "RowLinearSP", "autocast_inputs"]


def _wgrad(grad_y: Tensor, x: Tensor) -> Tensor:
    """grad_W = grad_y.T @ x over all leading dims: [*, N] x [*, K] -> [N, K]."""
    return grad_y.reshape(-1, grad_y.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))


def _bgrad(grad_y: Tensor, has_bias: bool) -> Tensor | None:
    return grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if has_bias else None


def autocast_inputs(x: Tensor, *tensors: Tensor | None) -> tuple:
    """(x, *tensors) in the dtype nn.Linear computes in: under torch.autocast for x's device, each
    floating-point tensor (fp64 excepted, as autocast does) cast to the autocast dtype, by a differentiable
    cast, so the Functions below see one dtype and the gradients reach fp32 parameters in fp32."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (x, *tensors)
    )


def _cat(ws: tuple[Tensor, ...]) -> Tensor:
    return ws[0] if len(ws) == 1 else torch.cat(ws)


def _wgrads(dy: Tensor, x: Tensor, ws: tuple[Tensor, ...], needs: tuple[bool, ...]) -> tuple:
    """The weight gradient of each part of W = cat(ws): one GEMM, split by rows."""
    if not any(needs):
        return (None,) * len(ws)
    parts = _wgrad(dy, x).split([w.shape[0] for w in ws])
    return tuple(p if need else None for p, need in zip(parts, needs))


# The column Functions take W as its parts ws (one part, or the layers of a SharedInputColumns group):
# the GEMMs use cat(ws), and backward concatenates again rather than keeping the copy alive between
# forward and backward (the parts are parameters, saved at no cost).


class ColumnLinear(torch.autograd.Function):
    """Column-parallel linear, replicated input (no sequence parallelism).

    x [*, K] (replicated), W [N/R, K] = cat(ws), b [N/R]
    forward  y [*, N/R]  = x @ W.T + b                       local, no communication
    dgrad    dx [*, K]   = all_reduce(dy @ W)                gemm_all_reduce(dy, W.T), overlapped
    wgrad    dW [N/R, K] = dy.T @ x;   db = sum(dy)
    """

    @staticmethod
    def forward(ctx, x, b, group, schedule, *ws):
        ctx.save_for_backward(x, *ws)
        ctx.group, ctx.schedule, ctx.has_bias = group, schedule, b is not None
        ctx.module = stats.current_module()
        return torch.nn.functional.linear(x, _cat(ws), b)

    @staticmethod
    def backward(ctx, dy):
        x, *ws = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            stats.record(
                "all_reduce", x.numel(), dy.dtype, ctx.group.size(), backward=True, module=ctx.module
            )
            dx = ops.gemm_all_reduce(dy.contiguous(), _cat(ws).t(), None, ctx.group, *ctx.schedule)
        return (dx, _bgrad(dy, ctx.has_bias), None, None, *_wgrads(dy, x, ws, ctx.needs_input_grad[4:]))


class ColumnLinearSP(torch.autograd.Function):
    """Column-parallel linear, sequence-parallel input.

        x_shard [s/R, *, K], W [N/R, K] = cat(ws), b [N/R]
        forward  x_full [s, *, K] = all_gather(x_shard)
                 y [s, *, N/R]    = x_full @ W.T + b             all_gather_gemm, overlapped
        dgrad    dx_shard [s/R, *, K] = reduce_scatter(dy @ W)   gemm_reduce_scatter(dy, W.T), overlapped
        wgrad    dW [N/R, K] = dy.T @ x_full;   db = sum(dy)

    keep_gathered=True saves x_full for wgrad (R times the shard's memory). False saves only x_shard
    and all-gathers it again in backward, after dgrad: 1/R of the activation memory for one more
    (not overlapped) all-gather per backward, Megatron's choice under SP.

    Returns (y, x_full). x_full is differentiable: a gradient that other code sends into it (each rank's
    partial, like dy @ W) is reduce-scattered into dx_shard too; unused, it costs nothing.
    """

    @staticmethod
    def forward(ctx, x_shard, b, group, schedule, keep_gathered, *ws):
        y, x_full = ops.all_gather_gemm(x_shard, _cat(ws), b, group, *schedule)
        stats.record("all_gather", x_full.numel(), x_full.dtype, group.size())
        ctx.save_for_backward(x_full if keep_gathered else x_shard, *ws)
        ctx.group, ctx.schedule, ctx.has_bias, ctx.keep_gathered = (
            group,
            schedule,
            b is not None,
            keep_gathered,
        )
        ctx.module = stats.current_module()
        ctx.set_materialize_grads(False)  # an unused x_full gets None, not a zero tensor to reduce-scatter
        return y, x_full

    @staticmethod
    def backward(ctx, dy, dx_full):
        x_saved, *ws = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0] and dy is not None:
            stats.record(
                "reduce_scatter",
                dy.shape[:-1].numel() * ws[0].shape[1],
                dy.dtype,
                ctx.group.size(),
                backward=True,
                module=ctx.module,
            )
            dx = ops.gemm_reduce_scatter(dy.contiguous(), _cat(ws).t(), None, ctx.group, *ctx.schedule)
        if ctx.needs_input_grad[0] and dx_full is not None:
            dx_other = mappings.reduce_scatter_dim0(dx_full, ctx.group, backward=True, module=ctx.module)
            dx = dx_other if dx is None else dx + dx_other
        if dy is None:
            return (dx, None, None, None, None, *(None,) * len(ws))
        needs = ctx.needs_input_grad[5:]
        x_full = x_saved
        if any(needs) and not ctx.keep_gathered:
            x_full = mappings.all_gather_dim0(x_saved, ctx.group, backward=True, module=ctx.module)
        return (dx, _bgrad(dy, ctx.has_bias), None, None, None, *_wgrads(dy, x_full, ws, needs))


class RowLinear(torch.autograd.Function):
    """Row-parallel linear, tensor-parallel input (no sequence parallelism).

    x [*, K/R], W [N, K/R], b [N] (replicated, added once after the reduction)
    forward  y [*, N]     = all_reduce(x @ W.T) + b          gemm_all_reduce, overlapped
    dgrad    dx [*, K/R]  = dy @ W                           local (dy is replicated)
    wgrad    dW [N, K/R]  = dy.T @ x;   db = sum(dy)         identical on every rank
    """

    @staticmethod
    def forward(ctx, x, w, b, group, schedule):
        y = ops.gemm_all_reduce(x, w, b, group, *schedule)
        stats.record("all_reduce", y.numel(), y.dtype, group.size())
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = dy.matmul(w) if ctx.needs_input_grad[0] else None
        dw = _wgrad(dy, x) if ctx.needs_input_grad[1] else None
        return dx, dw, _bgrad(dy, ctx.has_bias), None, None


class RowLinearSP(torch.autograd.Function):
    """Row-parallel linear, sequence-parallel output.

    x [s, *, K/R], W [N, K/R], b [N] (replicated, added once after the reduction)
    forward  y_shard [s/R, *, N] = reduce_scatter(x @ W.T) + b          gemm_reduce_scatter, overlapped
    dgrad    dy_full [s, *, N]   = all_gather(dy_shard)
             dx [s, *, K/R]      = dy_full @ W                          all_gather_gemm(dy, W.T), overlapped
    wgrad    dW [N, K/R] = dy_full.T @ x;   db = sum(dy_full)           identical on every rank
    """

    @staticmethod
    def forward(ctx, x, w, b, group, schedule):
        y_shard = ops.gemm_reduce_scatter(x, w, b, group, *schedule)
        stats.record("reduce_scatter", y_shard.numel() * group.size(), y_shard.dtype, group.size())
        ctx.save_for_backward(x, w)
        ctx.group, ctx.schedule, ctx.has_bias = group, schedule, b is not None
        ctx.module = stats.current_module()
        return y_shard

    @staticmethod
    def backward(ctx, dy_shard):
        x, w = ctx.saved_tensors
        stats.record(
            "all_gather",
            dy_shard.numel() * ctx.group.size(),
            dy_shard.dtype,
            ctx.group.size(),
            backward=True,
            module=ctx.module,
        )
        # The gathered dy is needed for the weight gradient whatever needs_input_grad says.
        dx, dy_full = ops.all_gather_gemm(dy_shard.contiguous(), w.t(), None, ctx.group, *ctx.schedule)
        dw = _wgrad(dy_full, x) if ctx.needs_input_grad[1] else None
        return (dx if ctx.needs_input_grad[0] else None), dw, _bgrad(dy_full, ctx.has_bias), None, None
