"""Communication as dual autograd pairs (Megatron's f/g and their sequence-parallel versions).

Each function is a collective in forward whose backward is its dual, so gradients of tensor-parallel
regions are exact without the user thinking about them:

    function                     forward                          backward
    copy_to_tp                   identity                         all-reduce
    reduce_from_tp               all-reduce                       identity
    scatter_to_sequence          keep this rank's dim-0 block     all-gather dim 0
    gather_from_sequence         all-gather dim 0                 reduce-scatter dim 0
      (replicated_grad=True)     all-gather dim 0                 keep this rank's dim-0 block
    reduce_scatter_to_sequence   reduce-scatter dim 0             all-gather dim 0
    scatter_to_tp                keep this rank's last-dim shard  all-gather last dim
    gather_from_tp               all-gather last dim              keep this rank's last-dim shard
    sum_replica_grads            identity                         sum over the ranks holding the same slice

The sequence functions take `dim`, the sequence dim (0 for [s, b, h], 1 for batch-first [b, s, h]).

Every one returns its input unchanged (and counts nothing) for a group of size 1. Dim-0 splits need
dim 0 divisible by the group size; last-dim splits follow shard_sizes (uneven allowed).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from tpext import stats
from tpext.distributed import GroupLike, resolve_group, shard_range, shard_sizes

__all__ = [
    "copy_to_tp",
    "reduce_from_tp",
    "scatter_to_sequence",
    "gather_from_sequence",
    "reduce_scatter_to_sequence",
    "scatter_to_tp",
    "gather_from_tp",
    "sum_replica_grads",
    "all_reduce",
    "all_gather_dim0",
    "reduce_scatter_dim0",
]


# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases only have the first names.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


# ---- plain collectives with accounting (used by the Functions below and by tpext.nn) ----------------


def all_reduce(
    x: Tensor,
    group: dist.ProcessGroup,
    *,
    backward: bool = False,
    module: str | None = None,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> Tensor:
    """In-place all-reduce of a contiguous tensor; returns it."""
    x = x.contiguous()
    stats.record("all_reduce", x.numel(), x.dtype, group.size(), backward=backward, module=module)
    dist.all_reduce(x, op=op, group=group)
    return x


def check_dim0_divisible(x: Tensor, world: int, what: str) -> None:
    if x.dim() == 0 or x.shape[0] % world != 0:
        raise ValueError(
            f"tpext: {what} needs dim 0 (the sequence dimension under sequence parallelism) divisible by the "
            f"tensor-parallel size {world}, got shape {tuple(x.shape)}"
        )


def all_gather_dim0(
    x: Tensor, group: dist.ProcessGroup, *, backward: bool = False, module: str | None = None
) -> Tensor:
    world = group.size()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    stats.record("all_gather", out.numel(), x.dtype, world, backward=backward, module=module)
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def reduce_scatter_dim0(
    x: Tensor, group: dist.ProcessGroup, *, backward: bool = False, module: str | None = None
) -> Tensor:
    world = group.size()
    check_dim0_divisible(x, world, "reduce-scatter")
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    stats.record("reduce_scatter", x.numel(), x.dtype, world, backward=backward, module=module)
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def new_output(t: Tensor) -> Tensor:
    """`t` as a tensor object of its own (same storage, no copy): what an autograd.Function's forward
    returns when `t` is a buffer it wrote in place or the result of a no-op (`contiguous()`, `to()` of
    the same dtype). torch 2.11's dynamo returns every intermediate of a Function's forward as an extra
    output of the traced Function; an intermediate that is at run time the returned tensor itself (what
    an in-place write returns, the input of a no-op) takes the returned tensor's slot in autograd, so the
    gradient of the real output never reaches backward, which gets zeros: silently zero input gradients
    under torch.compile (pytorch/pytorch#180642; torch 2.13 adds the extra outputs only for forwards with
    side effects). detach() makes a new tensor that no intermediate can be, and in eager it is still a
    plain output (not a view: in-place ops on it stay allowed)."""
    return t.detach()


def _contiguous(t: Tensor) -> Tensor:
    # Not t.contiguous() on a contiguous t: that traces as a second tensor identical to t (see new_output),
    # and a view of the input must stay one (autograd's check of in-place ops on a Function's views).
    return t if t.is_contiguous() else t.contiguous()


def _dim0_block(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    world = group.size()
    check_dim0_divisible(x, world, "splitting into sequence shards")
    rows = x.shape[0] // world
    return _contiguous(x.narrow(0, group.rank() * rows, rows))


def _last_dim_shard(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    start, size = shard_range(x.shape[-1], group.size(), group.rank())
    return _contiguous(x.narrow(-1, start, size))


def _all_gather_last_dim(
    x: Tensor, group: dist.ProcessGroup, full: int, *, backward: bool, module: str | None
) -> Tensor:
    """All-gather of uneven last-dim shards (sizes from shard_sizes(full, R)): padded to the largest."""
    world = group.size()
    sizes = shard_sizes(full, world)
    if x.shape[-1] != sizes[group.rank()]:
        raise ValueError(
            f"tpext: last dim {x.shape[-1]} is not this rank's shard of {full} (want "
            f"{sizes[group.rank()]}, shard sizes {sizes})"
        )
    padded = torch.nn.functional.pad(x, (0, sizes[0] - x.shape[-1])).contiguous()
    buf = padded.new_empty((world * padded.shape[0], *padded.shape[1:]))
    stats.record(
        "all_gather", math.prod(x.shape[:-1]) * full, x.dtype, world, backward=backward, module=module
    )
    _all_gather_single(buf, padded, group=group)
    buf = buf.view(world, *padded.shape)
    return torch.cat([buf[r].narrow(-1, 0, sizes[r]) for r in range(world)], dim=-1)


# ---- the autograd pairs ------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.module = group, stats.current_module()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group, backward=True, module=ctx.module), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return new_output(all_reduce(x.clone(), group))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.module = group, stats.current_module()
        return _dim0_block(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group, backward=True, module=ctx.module), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.module = group, stats.current_module()
        return new_output(all_gather_dim0(x, group))

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim0(grad, ctx.group, backward=True, module=ctx.module), None


class _GatherFromSequenceReplicatedGrad(torch.autograd.Function):
    """The gather for consumers with replicated weights: every rank's gradient is already the whole."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return new_output(all_gather_dim0(x, group))

    @staticmethod
    def backward(ctx, grad):
        return _dim0_block(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.module = group, stats.current_module()
        return new_output(reduce_scatter_dim0(x, group))

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group, backward=True, module=ctx.module), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.module, ctx.full = group, stats.current_module(), x.shape[-1]
        return _last_dim_shard(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.group, ctx.full, backward=True, module=ctx.module), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, full):
        ctx.group = group
        return _all_gather_last_dim(x, group, full, backward=False, module=None)

    @staticmethod
    def backward(ctx, grad):
        return _last_dim_shard(grad, ctx.group), None, None


class _SumReplicaGrads(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks that hold the same dense slice. Each
    rank writes the gradient of its replicated segments into a zero buffer spanning the replicated
    ranges of the dense tensor (e.g. the k and v rows of a GQA projection, not the q rows), one
    all-reduce sums them, and each keeps its own: ranks holding other heads add zeros. One call serves
    every replica set without subgroups, at the price of a buffer tp/kv times this rank's share."""

    @staticmethod
    def forward(ctx, x, layout, group):
        ctx.layout, ctx.group, ctx.module = layout, group, stats.current_module()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        layout, dim = ctx.layout, ctx.layout.dim
        shape = list(grad.shape)
        shape[dim] = sum(length for _, length in layout.reduce_ranges)
        buf = grad.new_zeros(shape)
        slots = layout.reduce_slots()
        for local, offset, length in slots:
            buf.narrow(dim, offset, length).copy_(grad.narrow(dim, local, length))
        all_reduce(buf, ctx.group, backward=True, module=ctx.module)
        grad = grad.clone()
        for local, offset, length in slots:
            grad.narrow(dim, local, length).copy_(buf.narrow(dim, offset, length))
        return grad, None, None


def sum_replica_grads(x: Tensor, layout, group: GroupLike = None) -> Tensor:
    """`x` (a local parameter with a tpext.sharding.ShardLayout) as is, its gradient summed over the ranks
    holding the same slices (layout.replicas > 1: a kv head replicated over several ranks)."""
    pg = resolve_group(group)
    if pg.size() == 1 or layout.replicas == 1:
        return x
    return _SumReplicaGrads.apply(x, layout, pg)


def _apply(fn, x: Tensor, group: GroupLike, *extra, dim: int = 0):
    pg = resolve_group(group)
    if pg.size() == 1:
        return x
    if dim == 0:
        return fn.apply(x, pg, *extra)
    return fn.apply(x.movedim(dim, 0), pg, *extra).movedim(0, dim)


def copy_to_tp(x: Tensor, group: GroupLike = None) -> Tensor:
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x: Tensor, group: GroupLike = None) -> Tensor:
    return _apply(_ReduceFromTP, x, group)


def scatter_to_sequence(x: Tensor, group: GroupLike = None, dim: int = 0) -> Tensor:
    return _apply(_ScatterToSequence, x, group, dim=dim)


def gather_from_sequence(
    x: Tensor, group: GroupLike = None, dim: int = 0, *, replicated_grad: bool = False
) -> Tensor:
    """The full sequence from every rank's shard. Backward: the gradient each rank sends is a partial sum
    (tensor-parallel consumers, such as a column-parallel layer) and is reduce-scattered; or, with
    replicated_grad=True, it is the whole gradient (consumers with replicated weights, every rank computing
    the same thing) and each rank keeps its block."""
    return _apply(
        _GatherFromSequenceReplicatedGrad if replicated_grad else _GatherFromSequence, x, group, dim=dim
    )


def reduce_scatter_to_sequence(x: Tensor, group: GroupLike = None, dim: int = 0) -> Tensor:
    return _apply(_ReduceScatterToSequence, x, group, dim=dim)


def scatter_to_tp(x: Tensor, group: GroupLike = None) -> Tensor:
    return _apply(_ScatterToTP, x, group)


def gather_from_tp(x: Tensor, full: int, group: GroupLike = None) -> Tensor:
    """All-gather last-dim shards of a `full`-wide tensor (shard sizes from shard_sizes(full, R))."""
    return _apply(_GatherFromTP, x, group, full)
