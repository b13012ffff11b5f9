"""Autograd Functions over the P2P ops: the row-parallel forward for small messages, and the fused
all-reduce + bias + residual + RMSNorm of a transformer block. R = tp size, H = hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpext import ops, stats
from tpext.nn._linear_functions import RowLinear

__all__ = ["RowLinearP2P", "AllReduceResidualRMSNorm"]


class RowLinearP2P(torch.autograd.Function):
    """Row-parallel linear whose all-reduce is a P2P op (small messages: decode).

    x [*, K/R], W [N, K/R], b [N] (replicated, added once after the reduction)
    forward  y [*, N]    = p2p_all_reduce(x @ W.T) + b       P2P kernel (or its fallback)
    dgrad    dx [*, K/R] = dy @ W                            local (dy is replicated)
    wgrad    dW [N, K/R] = dy.T @ x;   db = sum(dy)
    """

    @staticmethod
    def forward(ctx, x, w, b, group, algorithm):
        y = ops.p2p_all_reduce(F.linear(x, w), group, algorithm)
        stats.record("all_reduce", y.numel(), y.dtype, group.size())
        if b is not None:
            y = y + b
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return y

    # The same local backward as the NCCL row layer: same saved tensors, same argument layout.
    backward = RowLinear.backward


class AllReduceResidualRMSNorm(torch.autograd.Function):
    """(out, h) = (rms_norm(h) * weight, h), h = all_reduce(x) + bias + residual, fused.

    x [*, H] (this rank's partial sum), residual [*, H], weight [H], bias [H]: all but x replicated
    forward  h   = all_reduce(x) + bias + residual                   one P2P kernel (or fallback)
             out = h * rstd * weight,  rstd = 1 / sqrt(mean(h^2) + eps)
    backward dh  = rstd * (dout * w - n * mean(dout * w * n)) + dh_in,  n = h * rstd  (local)
             dx = dresidual = dh    (all-reduce's dual is the identity: dh is replicated)
             dweight = sum(dout * n);  dbias = sum(dh)                 identical on every rank
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, group, algorithm):
        out, h = ops.p2p_all_reduce_residual_rmsnorm(x, residual, weight, bias, eps, group, algorithm)
        stats.record("all_reduce", x.numel(), x.dtype, group.size())
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.has_residual, ctx.has_bias = eps, residual is not None, bias is not None
        return out, h

    @staticmethod
    def backward(ctx, dout, dh_in):
        h, weight = ctx.saved_tensors
        dh, dweight = torch.ops.tpext.p2p_rmsnorm_backward(
            dout.contiguous(), dh_in.contiguous(), h, weight, ctx.eps
        )
        dbias = dh.reshape(-1, dh.shape[-1]).sum(0) if ctx.has_bias else None
        return dh, (dh if ctx.has_residual else None), dweight, dbias, None, None, None
