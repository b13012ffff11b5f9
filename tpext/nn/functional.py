"""Functional tensor-parallel ops."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from tpext import mappings, p2p
from tpext.distributed import GroupLike, resolve_group, shard_range, shard_sizes
from tpext.nn.p2p_functions import AllReduceResidualRMSNorm

__all__ = ["vocab_parallel_cross_entropy", "all_reduce_residual_rmsnorm"]


class _VocabParallelCE(torch.autograd.Function):
    """Per-token loss  (1-eps) * (lse - z_t) + eps * (lse - mean_v z_v)  on vocab-sharded logits, where
    z = logits - max (the max over the whole vocabulary), lse = log sum_v exp z_v. Three small all-reduces
    of [tokens]-sized tensors, never the [tokens, V] logits: max, then (sum exp, target logit, sum z).
    Backward, local: dlogits = (softmax - (1-eps) * onehot(t) - eps / V) * dloss, zero for ignored tokens.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size, ignore_index, label_smoothing):
        compute = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        z = compute - mappings.all_reduce(compute.amax(-1), group, op=dist.ReduceOp.MAX).unsqueeze(-1)
        exp = z.exp()
        n_local = logits.shape[-1]
        outside = (target < vocab_start) | (target >= vocab_start + n_local)
        local_t = (target - vocab_start).masked_fill(outside, 0)
        z_t = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        sums = mappings.all_reduce(torch.stack([exp.sum(-1), z_t, z.sum(-1)]), group)
        sum_exp, z_t, sum_z = sums[0], sums[1], sums[2]
        lse = sum_exp.log()
        loss = (1.0 - label_smoothing) * (lse - z_t) + label_smoothing * (lse - sum_z / vocab_size)
        valid = target != ignore_index
        loss = loss.masked_fill(~valid, 0.0)
        ctx.save_for_backward(exp, sum_exp, local_t, outside, valid)
        ctx.label_smoothing, ctx.vocab_size, ctx.dtype = label_smoothing, vocab_size, logits.dtype
        return mappings.new_output(loss.to(logits.dtype))  # to() of fp32 logits' loss is loss itself

    @staticmethod
    def backward(ctx, dloss):
        exp, sum_exp, local_t, outside, valid = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = exp / sum_exp.unsqueeze(-1)
        if eps:
            grad = grad - eps / ctx.vocab_size
        onehot = torch.zeros_like(grad).scatter_(-1, local_t.unsqueeze(-1), 1.0)
        grad = grad - (1.0 - eps) * onehot.masked_fill(outside.unsqueeze(-1), 0.0)
        grad = grad * (dloss * valid).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group: GroupLike = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    vocab_size: int | None = None,
) -> Tensor:
    """Cross entropy of vocabulary-sharded logits, without materialising the full logits.

    Equal, in value and gradient, to F.cross_entropy on the gathered logits. The loss has the logits'
    dtype, or fp32 under torch.autocast, as F.cross_entropy's has.

    Args:
        logits_shard: [*, V_r], this rank's slice of the vocabulary (the layout of a column-parallel lm_head
            or of VocabParallelEmbedding: ``shard_sizes(V, R)``).
        target: [*], ids in [0, V) or ignore_index.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        ignore_index: target value whose tokens contribute nothing.
        label_smoothing: as F.cross_entropy's.
        reduction: "mean" (over non-ignored tokens), "sum" or "none" (ignored tokens give 0).
        vocab_size: the full V if known (a column-parallel lm_head's out_features): the shard is then checked
            locally; None: the shard widths are all-reduced to find V and this rank's offset (one more small
            collective, and a data-dependent step that breaks a torch.compile graph).

    Returns:
        The loss: a scalar, or [*] with reduction="none".

    Raises:
        ValueError: target not of shape ``logits_shard.shape[:-1]``, or a shard width that does not match
            `vocab_size` over the group (the message names the rank and both widths).

    Example:
        >>> loss = vocab_parallel_cross_entropy(lm_head(h), labels, vocab_size=lm_head.out_features)
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"tpext.vocab_parallel_cross_entropy: reduction must be 'mean', 'sum' or 'none', "
            f"got {reduction!r}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"tpext.vocab_parallel_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}"
        )
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(
            f"tpext.vocab_parallel_cross_entropy: target must be logits_shard.shape[:-1] = "
            f"{tuple(logits_shard.shape[:-1])}, got {tuple(target.shape)}"
        )
    if torch.is_autocast_enabled(logits_shard.device.type) and logits_shard.dtype in (
        torch.float16,
        torch.bfloat16,
    ):
        logits_shard = (
            logits_shard.float()
        )  # autocast runs cross entropy in fp32: the loss comes back in fp32
    pg = resolve_group(group)
    world, rank = pg.size(), pg.rank()
    if vocab_size is not None:
        vocab_start, width = shard_range(vocab_size, world, rank)
        if logits_shard.shape[-1] != width:
            raise ValueError(
                f"tpext.vocab_parallel_cross_entropy: rank {rank}'s shard of V = {vocab_size} over "
                f"{world} ranks has {width} logits, got {logits_shard.shape[-1]}"
            )
    else:
        # The full vocabulary size and this rank's offset, from every rank's shard width.
        widths = torch.zeros(
            world, dtype=torch.int64, device=logits_shard.device
        )  # NCCL reduces device tensors
        widths[rank] = logits_shard.shape[-1]
        if world > 1:
            mappings.all_reduce(widths, pg)
        vocab_size, vocab_start = int(widths.sum()), int(widths[:rank].sum())
        if widths.tolist() != shard_sizes(vocab_size, world):
            raise ValueError(
                f"tpext.vocab_parallel_cross_entropy: the vocabulary shards {widths.tolist()} are "
                f"not the near-even split {shard_sizes(vocab_size, world)} of V = {vocab_size}"
            )
    loss = _VocabParallelCE.apply(
        logits_shard, target, pg, vocab_start, vocab_size, ignore_index, label_smoothing
    )
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum()
    return loss


def all_reduce_residual_rmsnorm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor,
    eps: float = 1e-6,
    *,
    bias: Tensor | None = None,
    group: GroupLike = None,
) -> tuple[Tensor, Tensor]:
    """A transformer block's epilogue in one fused pass: all-reduce, residual add, RMSNorm.

    ``new_residual = all_reduce(x) + bias + residual`` and ``out = rms_norm(new_residual) * weight``.
    Differentiable (RMSNorm backward included). Small CUDA messages on a group where tpext.p2p.enable
    succeeded use the fused P2P kernel; otherwise the group's all-reduce followed by the same arithmetic
    (tpext.p2p decides, by size).

    Args:
        x: [*, H], this rank's partial sum (e.g. a row-parallel GEMM's output without bias).
        residual: [*, H] or None.
        weight: [H], replicated.
        eps: the RMSNorm epsilon.
        bias: [H] or None, replicated, added once after the reduction.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).

    Returns:
        (out, new_residual), both [*, H]. The tensors share one dtype; under torch.autocast they are
        promoted to the widest of theirs, as ``x + residual`` would be.

    Example:
        >>> h, residual = all_reduce_residual_rmsnorm(o_proj_partial, residual, norm.weight, norm.eps)
    """
    if torch.is_autocast_enabled(x.device.type):
        tensors = (x, residual, weight, bias)
        dtype = x.dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype) if t is not None else dtype
        x, residual, weight, bias = (t.to(dtype) if t is not None else None for t in tensors)
    pg = resolve_group(group)
    algorithm = p2p.algorithm_for(x, pg)
    return AllReduceResidualRMSNorm.apply(
        x, residual, weight, bias, eps, pg, p2p.ALGO_C10D if algorithm is None else algorithm
    )
