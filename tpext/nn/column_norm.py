"""RMSNorm over features that a column-parallel layer shards (q/k norms inside sharded attention):
`ColumnParallelRMSNorm`, and `shard_norm_features` for a model's own norm module.

Each rank holds its features of the input and of the weight. An RMSNorm over all of them sums the squares of
its features and all-reduces one number per token for the dense statistic; a norm of each head on its own
with a weight per head keeps its code with this rank's rows of the weight. docs/modules.md says which models'
norms take which path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group
from tpext.nn.class_swap import derived_class, probe_copy, probe_disagrees, shell_copy
from tpext.nn.norm import sum_param_grads
from tpext.sharding import Piece, ShardLayout, piece_segments, set_layout

__all__ = ["ColumnParallelRMSNorm", "shard_norm_features"]


def _feature_layout(
    shape: Sequence[int], pieces: Sequence[Piece], group: dist.ProcessGroup, what: str
) -> ShardLayout:
    """The layout of a norm weight over column-sharded features: [features] split as `pieces`, or
    [heads, head_dim] (one piece of heads) split by rows."""
    segments, replicas, ranges = piece_segments(pieces, group.size(), group.rank(), what)
    world = group.size()
    factors = {
        world // p.units for p in pieces if p.unit_size > 1 and p.units % world and world % p.units == 0
    }
    if len(factors) > 1:  # the sum of squares weighs a replicated feature by 1 / layout.replicas
        raise ValueError(
            f"tpext: {what}: pieces {list(pieces)} would be replicated over different numbers of "
            f"ranks ({sorted(factors)}) at tp={world}; give them head counts that tp divides, or "
            "one count for all"
        )
    if len(shape) == 2:  # rows are heads: the feature segments in units of head_dim
        d = pieces[0].unit_size
        segments, ranges = (tuple((s // d, n // d) for s, n in seg) for seg in (segments, ranges))
    return ShardLayout(tuple(shape), 0, segments, replicas, ranges)


def _column_parallel_rms_norm(
    x: Tensor, weight: Tensor, eps: float | None, layout: ShardLayout, group: dist.ProcessGroup, what: str
) -> Tensor:
    """RMSNorm of features sharded over `group` (x holds this rank's, laid out as `layout`), in fp32 (fp64
    for fp64 input): x * rsqrt(mean over all features of x^2 + eps) * weight, cast back to x's dtype."""
    local, dense = layout.local_shape[0], layout.dense_shape[0]
    if x.dim() < 1 or x.shape[-1] != local:
        raise ValueError(
            f"tpext.{what}: input must be [*, {local}] (this rank's features of {dense}), got shape "
            f"{tuple(x.shape)}"
        )
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    squares = h.square()
    total = squares.sum(-1, keepdim=True)
    if layout.replicas > 1:  # features that several ranks hold count once in the dense sum
        for offset, _, length in layout.reduce_slots():
            total = total - (1 - 1 / layout.replicas) * squares.narrow(-1, offset, length).sum(
                -1, keepdim=True
            )
        weight = mappings.sum_replica_grads(weight, layout, group)
    # Forward: the dense sum of squares on every rank. Backward: every rank's heads used it, so its
    # gradient is the sum of theirs.
    total = mappings.reduce_from_tp(mappings.copy_to_tp(total, group), group)
    eps = torch.finfo(h.dtype).eps if eps is None else eps  # None: that of the compute dtype, as F.rms_norm
    return (weight * (h * torch.rsqrt(total / dense + eps))).to(x.dtype)


class _ColumnParallelRMS(SharesGroupOnCopy):
    """The forward of an RMSNorm over features sharded across the group (ColumnParallelRMSNorm, and a
    model's own RMSNorm class converted by shard_norm_features)."""

    _tpext_group: dist.ProcessGroup
    _tpext_eps: float | None

    def forward(self, x: Tensor) -> Tensor:
        with stats.scope_for(self):
            return _column_parallel_rms_norm(
                x,
                self.weight,
                self._tpext_eps,
                self._tpext_layouts["weight"],
                self._tpext_group,
                type(self).__name__,
            )

    def extra_repr(self) -> str:
        layout = self._tpext_layouts["weight"]
        return (
            f"{layout.dense_shape[0]} features over tp={self._tpext_group.size()}, local={layout.local_shape[0]}, "
            f"eps={self._tpext_eps}{f', replicas={layout.replicas}' if layout.replicas > 1 else ''}"
        )


class ColumnParallelRMSNorm(_ColumnParallelRMS, nn.Module):
    """RMSNorm over `normalized_size` features that a ColumnParallelLinear's output shards over the group.

    A query/key norm over all heads: each rank holds its features of the weight and of the input, and the
    mean square is taken over all features (one all-reduce of a number per token in forward, one in
    backward). Statistics are computed in fp32 and the result cast back.

    Args:
        normalized_size: the dense number of features.
        eps: the epsilon; None: that of the compute dtype, as nn.RMSNorm's.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        pieces: as the column layer's (e.g. ``(Piece(heads, head_dim),)``), so each rank holds the norm weight
            of its heads; a kv head replicated over several ranks counts once.
        device, dtype: of the weight.

    Shapes:
        input: [*, local features]. Output: the same shape.

    Raises:
        ValueError: pieces that do not add up to `normalized_size` or would be replicated unevenly, or an
            input of another width (the message names the expected local width).

    Example:
        >>> q_norm = tpext.nn.ColumnParallelRMSNorm(4096, pieces=(Piece(32, 128),))
        >>> q = q_norm(q_proj(x))  # q_proj: a ColumnParallelLinear with the same pieces
    """

    def __init__(
        self,
        normalized_size: int,
        eps: float | None = 1e-6,
        *,
        group: GroupLike = None,
        pieces: Sequence[Piece] | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        pieces = tuple(pieces) if pieces is not None else (Piece(normalized_size),)
        if sum(p.size for p in pieces) != normalized_size:
            raise ValueError(
                f"tpext.ColumnParallelRMSNorm: pieces {list(pieces)} add up to "
                f"{sum(p.size for p in pieces)}, not normalized_size {normalized_size}"
            )
        self._tpext_group = resolve_group(group)
        self._tpext_eps = eps
        layout = _feature_layout(
            (normalized_size,), pieces, self._tpext_group, f"ColumnParallelRMSNorm({normalized_size})"
        )
        set_layout(self, "weight", layout)
        self.weight = nn.Parameter(torch.ones(layout.local_shape, device=device, dtype=dtype))

    @property
    def group(self) -> dist.ProcessGroup:
        return self._tpext_group

    @property
    def eps(self) -> float | None:
        return self._tpext_eps


def _probe_input(shape: Sequence[int]) -> Tensor:
    """Random inputs for a norm probe, some scaled down so that its epsilon counts in the result."""
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    return x * torch.tensor([1.0, 1.0, 1e-3, 1e-3]).view(-1, *[1] * len(shape))


def _epsilon(norm: nn.Module):
    for attr in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, attr):
            return getattr(norm, attr)
    raise ValueError("it has no variance_epsilon, eps or epsilon attribute giving its epsilon")


def shard_norm_features(norm: nn.Module, group: GroupLike, pieces: Sequence[Piece]) -> nn.Module:
    """A copy of `norm` (a model's own module) for this rank's part of features that a column layer shards.

    For a q/k norm after q_proj / k_proj sharded as ``(Piece(heads, head_dim),)``:

    * weight [heads, head_dim], normalising each head on its own: the module's class and code with this
      rank's rows of its parameters (gradients of replicated kv heads summed over their holders).
    * weight [features], an RMSNorm over all of them: the module's class with ColumnParallelRMSNorm's
      forward (fp32 statistics, weight applied in fp32, cast back).

    A copy of the module is run first on a random input to check that it computes what that assumes.

    Args:
        norm: the dense norm module.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        pieces: the column layer's pieces.

    Returns:
        The sharded copy, or `norm` itself when the group has size 1.

    Raises:
        ValueError: the module normalises across heads, is not an RMSNorm (a mean, a bias, 1 + weight, another
            epsilon than it declares, extra buffers), or its weight does not match the pieces; the message
            names the module's class and the cause.

    Example:
        >>> attn.q_norm = tpext.nn.shard_norm_features(attn.q_norm, None, (Piece(32, 128),))
    """
    pg = resolve_group(group)
    cls = type(norm).__name__
    weight = getattr(norm, "weight", None)
    features = sum(p.size for p in pieces)
    if not isinstance(weight, Tensor):
        raise ValueError(f"tpext: cannot shard {cls} over features: it has no weight")
    if pg.size() == 1:
        return norm
    layout = _feature_layout(weight.shape, pieces, pg, f"the weight of {cls}")
    if (
        weight.dim() == 2
        and len(pieces) == 1
        and tuple(weight.shape) == (pieces[0].units, pieces[0].unit_size)
    ):
        return _head_rows(norm, layout, pg)
    if weight.dim() == 1 and weight.numel() == features:
        return _sharded_rms(norm, layout, pg)
    raise ValueError(
        f"tpext: cannot shard {cls} over {features} features ({list(pieces)}): its weight is "
        f"{list(weight.shape)}, neither [{features}] nor [heads, head_dim]"
    )


def _head_rows(norm: nn.Module, layout: ShardLayout, pg: dist.ProcessGroup) -> nn.Module:
    """`norm` with this rank's rows (heads) of its [heads, head_dim] parameters, its own code unchanged."""
    cls, params = type(norm).__name__, dict(norm.named_parameters(recurse=False))
    if any(p.shape != norm.weight.shape for p in params.values()):
        raise ValueError(
            f"tpext: cannot shard {cls} by heads: its parameters "
            f"{ {n: list(p.shape) for n, p in params.items()} } are not all [heads, head_dim]"
        )
    per_head = [
        name
        for name, b in norm.named_buffers(recurse=False)
        if b.dim() and b.shape[0] == norm.weight.shape[0]
    ]
    if per_head:
        raise ValueError(
            f"tpext: cannot shard {cls} by heads: its buffers {per_head} look per head; tpext "
            "slices only its parameters"
        )

    def local_heads(t: Tensor) -> Tensor:  # [tokens, heads, head_dim] -> this rank's heads
        return torch.cat([t.narrow(1, start, length) for start, length in layout.segments], 1)

    probe = probe_copy(norm)
    rows = shell_copy(probe)
    for name in params:
        rows._parameters[name] = nn.Parameter(layout.local_from_dense(probe._parameters[name].detach()))
    x = _probe_input(norm.weight.shape)
    why = probe_disagrees(
        lambda: (rows.forward(local_heads(x)), local_heads(probe.forward(x))),
        rtol=1e-5,
        atol=1e-6,
        differs="it normalises across heads?",
    )
    if why:
        raise ValueError(
            f"tpext: cannot shard {cls} by heads: on this rank's heads alone it does not compute "
            f"what it computes on all of them ({why})"
        )
    new = shell_copy(norm)
    for name, p in params.items():
        new._parameters[name] = nn.Parameter(
            layout.local_from_dense(p.detach()).clone(), requires_grad=p.requires_grad
        )
        set_layout(new, name, layout)
    return sum_param_grads(new, pg)


def _sharded_rms(norm: nn.Module, layout: ShardLayout, pg: dist.ProcessGroup) -> nn.Module:
    """`norm`, an RMSNorm over all the features, with this rank's features of its weight and
    ColumnParallelRMSNorm's forward; its class is kept."""
    cls, params = type(norm).__name__, dict(norm.named_parameters(recurse=False))
    buffers = sorted(name for name, _ in norm.named_buffers(recurse=False))
    if set(params) != {"weight"} or buffers:
        raise ValueError(
            f"tpext: cannot shard {cls} over features: it has parameters {sorted(params)}"
            f"{f' and buffers {buffers}' if buffers else ''}; only an RMSNorm with a weight alone "
            "can be computed from sharded features"
        )
    try:
        eps = _epsilon(norm)
    except ValueError as exc:
        raise ValueError(f"tpext: cannot shard {cls} over features: {exc}") from exc
    probe = probe_copy(norm)
    x = _probe_input(norm.weight.shape)

    def rms_norm() -> tuple[Tensor, Tensor]:
        rms = torch.rsqrt(
            x.square().mean(-1, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps)
        )
        return probe.forward(x), probe.weight * x * rms

    why = probe_disagrees(rms_norm, rtol=1e-5, atol=1e-6, differs="it differs")
    if why:
        raise ValueError(
            f"tpext: cannot shard {cls} over features: it does not compute RMSNorm "
            f"(x * rsqrt(mean(x^2) + eps) * weight) on its features ({why})"
        )
    new = shell_copy(norm)
    new.__class__ = derived_class(type(norm), _ColumnParallelRMS, wraps=True)
    new._tpext_group, new._tpext_eps = pg, eps
    new._parameters["weight"] = nn.Parameter(
        layout.local_from_dense(norm.weight.detach()).clone(), requires_grad=norm.weight.requires_grad
    )
    set_layout(new, "weight", layout)
    return new
