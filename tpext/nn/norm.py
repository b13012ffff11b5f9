"""Norms under tensor parallelism: sequence-parallel LayerNorm / RMSNorm, the gradient rule for replicated
norm weights (`sum_param_grads`), and RMSNorm over column-sharded features (`ColumnParallelRMSNorm`,
`shard_norm_features`).

Under sequence parallelism each rank normalises only its tokens while the weights are replicated, so the
weight gradients are summed over the group in backward (the weights pass through copy_to_tp). A norm of a
column-parallel layer's output sees only this rank's features: an RMSNorm over all of them all-reduces one
sum of squares per token. docs/modules.md says which models' norms take which path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group
from tpext.nn.class_swap import derived_class, probe_copy, probe_disagrees, shell_copy
from tpext.sharding import Piece, ShardLayout, get_layout, piece_segments, set_layout

__all__ = [
    "SequenceParallelLayerNorm",
    "SequenceParallelRMSNorm",
    "ColumnParallelRMSNorm",
    "sum_param_grads",
    "shard_norm_features",
]

Shape = int | Sequence[int]


class _SPNorm(SharesGroupOnCopy, nn.Module):
    def __init__(
        self,
        normalized_shape: Shape,
        eps: float,
        bias: bool,
        group: GroupLike,
        sequence_parallel: bool,
        device,
        dtype,
    ):
        super().__init__()
        self.normalized_shape = (
            (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        )
        self.eps = eps
        self.group = resolve_group(group)
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype)) if bias else None
        )

    def _params(self):
        """The weights as this forward uses them: gradients summed over the group under SP."""
        if not self.sequence_parallel:
            return self.weight, self.bias
        w = mappings.copy_to_tp(self.weight, self.group)
        b = mappings.copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return w, b

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class SequenceParallelLayerNorm(_SPNorm):
    """nn.LayerNorm over a sequence shard, with weight/bias gradients all-reduced over the group.

    Each rank normalises its own tokens; the gradients of the replicated weight and bias are summed over
    the group in backward, so every rank holds the full gradient (identical replicas).

    Args:
        normalized_shape, eps, bias, device, dtype: as nn.LayerNorm's.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        sequence_parallel: False: a plain nn.LayerNorm (no gradient all-reduce).

    Example:
        >>> norm = tpext.nn.SequenceParallelLayerNorm(4096)
        >>> y_shard = norm(x_shard)  # [s/R, *, 4096]; backward all-reduces grad_w and grad_b
    """

    def __init__(
        self,
        normalized_shape: Shape,
        eps: float = 1e-5,
        bias: bool = True,
        *,
        group: GroupLike = None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, eps, bias, group, sequence_parallel, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        with stats.scope_for(self):
            w, b = self._params()
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class SequenceParallelRMSNorm(_SPNorm):
    """nn.RMSNorm over a sequence shard, with the weight gradient all-reduced over the group.

    Args:
        normalized_shape, eps, device, dtype: as nn.RMSNorm's (always with a weight).
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        sequence_parallel: False: a plain nn.RMSNorm (no gradient all-reduce).

    Example:
        >>> norm = tpext.nn.SequenceParallelRMSNorm(4096)
        >>> y_shard = norm(x_shard)  # backward all-reduces grad_w once
    """

    def __init__(
        self,
        normalized_shape: Shape,
        eps: float = 1e-6,
        *,
        group: GroupLike = None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(normalized_shape, eps, False, group, sequence_parallel, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        with stats.scope_for(self):
            w, _ = self._params()
            return F.rms_norm(x, self.normalized_shape, w, self.eps)


# One forward at a time swaps parameters (threads, or a checkpoint recompute on the autograd thread):
# a second one would take the first one's stand-ins for the parameters.
_SWAP_LOCK = threading.RLock()


class _SumsParamGrads(SharesGroupOnCopy):
    """Wraps a module's own class (sum_param_grads; tpext.parallelize's norms): its forward runs unchanged,
    with the module's own parameters read through stand-ins whose backward sums their gradients over the
    ranks that hold the same values: every rank of the group for a replicated parameter (copy_to_tp), the
    ranks holding the same slice for a sharded one (sum_replica_grads: a kv head's norm weight when kv heads
    are replicated). The module's arithmetic is unchanged; only the gradients change. A parameter that a
    wrapper keeps as a plain tensor attribute during forward (FSDP1's views) is read through it too."""

    _tpext_group: dist.ProcessGroup
    _tpext_param_names: tuple[str, ...]  # the parameters whose gradients are summed

    def forward(self, *args, **kwargs):
        if not self._tpext_param_names:  # sharded weights that no other rank holds: nothing to sum
            return super().forward(*args, **kwargs)
        if (
            torch.compiler.is_compiling()
        ):  # the graph inlines the swap as functional ops: nothing shared changes
            return self._forward_swapped(args, kwargs)
        with _SWAP_LOCK, stats.scope_for(self):
            return self._forward_swapped(args, kwargs)

    def _stand_in(self, name: str, tensor: Tensor) -> Tensor:
        layout = get_layout(self, name, tensor)
        if layout.is_sharded:
            return mappings.sum_replica_grads(tensor, layout, self._tpext_group)
        return mappings.copy_to_tp(tensor, self._tpext_group)

    def _forward_swapped(self, args: tuple, kwargs: dict):
        swapped = []  # (where the tensor lives, name, the tensor, its stand-in)
        try:
            for name in self._tpext_param_names:
                # Where `self.<name>` reads from: the instance dict first (a wrapper's plain tensor).
                where = self.__dict__ if isinstance(self.__dict__.get(name), Tensor) else self._parameters
                tensor = where.get(name)
                if isinstance(tensor, Tensor):
                    stand_in = self._stand_in(name, tensor)
                    where[name] = stand_in
                    swapped.append((where, name, tensor, stand_in))
            return super().forward(*args, **kwargs)
        finally:
            for where, name, tensor, stand_in in swapped:
                if where.get(name) is stand_in:  # unless the forward itself replaced it
                    where[name] = tensor

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        what = f"tp={self._tpext_group.size()}"
        for name in getattr(self, "_tpext_layouts", {}):  # this rank's heads of a sharded weight
            what += f", local {name}={tuple(getattr(self, name).shape)}"
        what += ", grads summed" if self._tpext_param_names else ""
        return f"{inner}{', ' if inner else ''}{what}"


def sum_param_grads(module: nn.Module, group: GroupLike = None) -> nn.Module:
    """Make `module` sum the gradients of its own parameters over `group`, in place.

    For a module with replicated weights that each rank applies to different tokens (a norm under sequence
    parallelism) or to different heads (a per-head q/k norm). A parameter with a tpext.sharding layout has
    its gradient summed over the ranks holding the same slice only. Names, state dict and arithmetic are
    unchanged; `isinstance` still holds.

    Args:
        module: any module; only its own (not its children's) parameters are affected.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).

    Returns:
        `module` itself (unchanged when the group has size 1).

    Example:
        >>> norm = tpext.nn.sum_param_grads(block.input_layernorm)  # a model's own norm class, kept
    """
    pg = resolve_group(group)
    if pg.size() == 1 or isinstance(module, _SumsParamGrads):
        return module
    module.__class__ = derived_class(type(module), _SumsParamGrads, wraps=True)
    module._tpext_group = pg
    layouts = {name: get_layout(module, name, p) for name, p in module.named_parameters(recurse=False)}
    module._tpext_param_names = tuple(
        name for name, lay in layouts.items() if not lay.is_sharded or lay.replicas > 1
    )
    return module


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
