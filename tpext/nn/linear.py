"""Column- and row-parallel linear layers (Megatron layout), with and without sequence parallelism.

A Column -> Row pair is the tensor-parallel MLP (or attention projection): the column layer shards the
output features, the row layer shards its input features the same way, and only the row layer's output
is reduced. Without SP that is one all-reduce per forward (and one per backward, in the column layer's
dgrad); with SP the all-reduce becomes an all-gather before the column layer and a reduce-scatter after
the row layer, both overlapped with their GEMM. Uneven feature counts follow shard_sizes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, p2p, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group
from tpext.nn._linear_functions import (
    ColumnLinear,
    ColumnLinearSP,
    RowLinear,
    RowLinearSP,
    _cat,
    autocast_inputs,
)
from tpext.nn.p2p_functions import RowLinearP2P
from tpext.ops.schedule import AlgorithmLike, Chunks, Schedule, resolve_chunks, resolve_schedule
from tpext.sharding import Piece, ShardLayout, piece_segments, set_layout

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "SharedInputColumns"]


class _ParallelLinear(SharesGroupOnCopy, nn.Module):
    """What both layers share: the group, the local weight/bias, init, and the input checks."""

    #: Schedule of the overlapped ops (tpext.ops.Algorithm or "auto"); set on an instance to override
    #: the planner's choice, like the `chunks` argument overrides its chunk count.
    algorithm: AlgorithmLike = "auto"
    #: The weight is stored as Hugging Face's Conv1D stores it, [in, out] (x @ W + b), and used transposed.
    transposed_weight = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group: GroupLike,
        sharded_dim: int,
        sequence_parallel: bool,
        chunks: Chunks,
        device,
        dtype,
        pieces: Sequence[Piece] | None = None,
        sequence_dim: int = 0,
    ):
        super().__init__()
        self.group = resolve_group(group)
        self.tp_size, self.tp_rank = self.group.size(), self.group.rank()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        resolve_chunks(chunks, 1, 1)  # validate now, decide per call
        self.chunks = chunks
        full = (out_features, in_features)
        # The sharded dim is one piece (near-even split) unless the caller says it is packed or made of
        # whole heads; see tpext.sharding.piece_segments.
        pieces = tuple(pieces) if pieces is not None else (Piece(full[sharded_dim]),)
        if sum(p.size for p in pieces) != full[sharded_dim]:
            raise ValueError(
                f"tpext.{type(self).__name__}: pieces {list(pieces)} add up to "
                f"{sum(p.size for p in pieces)}, not the sharded dim's {full[sharded_dim]}"
            )
        segments, self.replicas, reduce_ranges = piece_segments(
            pieces, self.tp_size, self.tp_rank, f"{type(self).__name__}({in_features}, {out_features})"
        )
        self.packed = len(pieces) > 1
        self.shard_start = segments[0][0]
        weight_layout = (
            ShardLayout(full[::-1], 1 - sharded_dim, segments, self.replicas, reduce_ranges)
            if self.transposed_weight
            else ShardLayout(full, sharded_dim, segments, self.replicas, reduce_ranges)
        )
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(weight_layout.local_shape, **factory))
        set_layout(self, "weight", weight_layout)
        # The column layer's bias is sharded with its outputs; the row layer's is replicated.
        if bias:
            bias_layout = (
                ShardLayout((out_features,), 0, segments, self.replicas, reduce_ranges)
                if sharded_dim == 0
                else ShardLayout.replicated((out_features,))
            )
            self.bias = nn.Parameter(torch.empty(bias_layout.local_shape, **factory))
            set_layout(self, "bias", bias_layout)
        else:
            self.bias = None
        self.reset_parameters()

    @classmethod
    def _from_dense(cls, linear: nn.Module, group: GroupLike, **kwargs):
        # Built on the meta device, so no init runs: an init would draw from the global RNG a number of
        # values that depends on the shard size, leaving ranks with uneven shards in different RNG states.
        in_features, out_features = (
            linear.weight.shape[::-1] if not cls.transposed_weight else linear.weight.shape
        )
        layer = cls(
            in_features,
            out_features,
            linear.bias is not None,
            group=group,
            device="meta",
            dtype=linear.weight.dtype,
            **kwargs,
        )
        if not linear.weight.is_meta:  # a meta-device model is filled later, from a checkpoint
            layer.to_empty(device=linear.weight.device)
            layer._load_dense(linear)
        return layer

    def _load_dense(self, linear: nn.Linear) -> None:
        """Copy this rank's slices of a dense nn.Linear."""
        with torch.no_grad():
            self.weight.copy_(self._tpext_layouts["weight"].local_from_dense(linear.weight))
            if self.bias is not None:
                self.bias.copy_(self._tpext_layouts["bias"].local_from_dense(linear.bias))

    def _params(self) -> tuple[Tensor, Tensor | None]:
        """The weights as this forward uses them, [out, in] ([out/R, in] or [out, in/R] here). A head
        replicated over several ranks (GQA with more ranks than kv heads) gets only part of its gradient on
        each: those parts are summed here."""
        if self.replicas == 1:
            w, b = self.weight, self.bias
        else:
            w = mappings.sum_replica_grads(self.weight, self._tpext_layouts["weight"], self.group)
            b = (
                mappings.sum_replica_grads(self.bias, self._tpext_layouts["bias"], self.group)
                if self.bias is not None
                else None
            )
        # A Conv1D's [in, out] weight: the ops take [out, in] rows, so a transposed copy per call (the
        # gradient flows back through it into the stored layout).
        return (w.t().contiguous() if self.transposed_weight else w), b

    @property
    def local_weight_shape(self) -> tuple[int, int]:
        """This rank's weight as [out, in], whichever way it is stored."""
        shape = tuple(self.weight.shape)
        return shape[::-1] if self.transposed_weight else shape

    def reset_parameters(self) -> None:
        # nn.Linear's init, with the bound of the *full* layer (fan_in = in_features, not its shard).
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _check_features(self, x: Tensor, want: int, what: str) -> None:
        if x.dim() < 1 or x.shape[-1] != want:
            raise ValueError(
                f"tpext.{type(self).__name__}: input must be [*, {want}] ({what}), got shape {tuple(x.shape)}"
            )

    def _sequence_first(self, x: Tensor) -> Tensor:
        """Under SP the sequence dim (0, or 1 for batch-first [b, s, h]) moves to dim 0 for the ops."""
        if x.dim() < 2 or self.sequence_dim >= x.dim() - 1:
            raise ValueError(
                f"tpext.{type(self).__name__}: with sequence_parallel the input must have the "
                f"sequence in dim {self.sequence_dim} and features last, got shape {tuple(x.shape)}"
            )
        return x.movedim(self.sequence_dim, 0) if self.sequence_dim else x

    def _check_sequence(self, x: Tensor, rows: int) -> None:
        if rows % self.tp_size != 0:
            raise ValueError(
                f"tpext.{type(self).__name__}: sequence_parallel needs the sequence length "
                f"(dim {self.sequence_dim}) divisible by the tensor-parallel size {self.tp_size}, "
                f"got {rows} (input shape {tuple(x.shape)})"
            )

    def _schedule(self, rows: int, x: Tensor) -> Schedule:
        """The (chunks, algorithm) schedule the ops get for `rows` rows of GEMM output from input x."""
        # What the collectives move per row: the input features of a column layer (its dgrad, and the
        # gathered input under SP), the output features of a row layer.
        features = self.in_features if isinstance(self, ColumnParallelLinear) else self.out_features
        return resolve_schedule(
            self.chunks, self.algorithm, rows, self.tp_size, x.device.type, features * x.element_size()
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{'weight stored [in, out], ' if self.transposed_weight else ''}"
            f"tp={self.tp_rank}/{self.tp_size}, sequence_parallel={self.sequence_parallel}, "
            f"{'packed, ' if self.packed else ''}{f'replicas={self.replicas}, ' if self.replicas > 1 else ''}"
            f"local weight={tuple(self.weight.shape)}"
        )


class ColumnParallelLinear(_ParallelLinear):
    """Linear layer ``y = x @ W.T + b`` with W [out_features, in_features] sharded by rows (output features).

    Each rank holds weight [out/R, in] and bias [out/R] (R = group size; uneven R: ceil or floor of out/R).
    Without sequence parallelism the input is replicated and backward all-reduces grad_x, overlapped with
    its GEMM. With it, the forward all-gathers the sequence overlapped with the GEMM and backward
    reduce-scatters grad_x. The gathered input is gathered again in backward rather than kept (activation
    memory 1/R of it) unless ``keep_gathered_input``.

    Args:
        in_features: K, the input width (not sharded).
        out_features: N, the dense output width, sharded over the group.
        bias: whether the layer has a bias [N/R].
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        gather_output: return [*, N] (all-gathered) instead of this rank's [*, N/R]; not with
            sequence_parallel.
        sequence_parallel: the input is this rank's sequence shard [s/R, *, K] (s divisible by R).
        chunks: "auto" (`tpext.ops.auto_schedule`) or an int >= 1, the chunks of the overlapped ops.
        pieces: how the output features split into units (e.g. ``(Piece(heads, head_dim),)``) so each rank
            holds whole heads; None: one piece of N features.
        sequence_dim: the sequence dim of a sequence-parallel input (0, or 1 for batch-first [b, s, K]).
        keep_gathered_input: keep the gathered input for the weight gradient (R times the memory, one
            all-gather less per backward).
        device, dtype: of the parameters, as nn.Linear's.

    Shapes:
        input: [*, K], or [s/R, *, K] with sequence_parallel. Output: [*, N/R] ([*, N] with gather_output),
        or [s, *, N/R] with sequence_parallel.

    Raises:
        ValueError: an input of the wrong width or sequence length, or bad sizes/pieces; the message names
            the layer and what it expected.

    Example:
        >>> col = tpext.nn.ColumnParallelLinear.from_dense(nn.Linear(512, 2048))  # the world group
        >>> y_shard = col(x)  # [*, 2048 / R]
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: GroupLike = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        chunks: Chunks = "auto",
        pieces: Sequence[Piece] | None = None,
        sequence_dim: int = 0,
        keep_gathered_input: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_features,
            out_features,
            bias,
            group,
            0,
            sequence_parallel,
            chunks,
            device,
            dtype,
            pieces,
            sequence_dim,
        )
        self.keep_gathered_input = keep_gathered_input
        if gather_output and (self.packed or self.replicas > 1):
            raise ValueError(
                "tpext.ColumnParallelLinear: gather_output needs a plain (one-piece, unreplicated) "
                "output sharding; gather packed outputs piece by piece instead"
            )
        self.gather_output = gather_output

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: GroupLike = None, **kwargs) -> ColumnParallelLinear:
        """Shard an nn.Linear: this rank keeps its rows of the weight and bias (rows [start, start + out/R),
        or with `pieces` its rows of every sub-matrix)."""
        return cls._from_dense(linear, group, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        self._check_features(x, self.in_features, "in_features")
        if self.tp_size > 1 and self._siblings is not None:
            return self._siblings(self, x)
        with stats.scope_for(self):
            w, b = self._params()
            if self.tp_size == 1:
                return F.linear(x, w, b)
            return self._column(x, (w,), b)

    # Set by SharedInputColumns.attach when this layer shares its input with siblings (q/k/v, gate/up).
    _siblings: SharedInputColumns | None = None
    # Set by tpext.parallelize under SP on an attention module's projections, whose input a forward pre-hook
    # all-gathers (tpext.parallel.sequence): tells whether a tensor is the full sequence that hook returned.
    _is_gathered_input: Callable[[Tensor], bool] | None = None

    def _column(self, x: Tensor, ws: tuple[Tensor, ...], b: Tensor | None) -> Tensor:
        """The column-parallel product of x with the local weight cat(ws) and bias b (this layer's, or
        those of a SharedInputColumns group)."""
        hooked = self._is_gathered_input
        if (
            self.sequence_parallel and hooked is None
        ):  # x is a sequence shard: any length gathers to R times it
            y, _ = self._column_sp(x, ws, b)
        else:
            gathered = self.sequence_parallel and hooked(x)
            x, b, *ws = autocast_inputs(x, b, *ws)
            if gathered:
                # The full sequence the attention's hook gathered (in a call SharedInputColumns did not
                # answer): the gradient, partial on each rank, is summed by the gather's backward.
                y = F.linear(x, _cat(tuple(ws)), b)
            else:  # a replicated input: without SP, or another input of a hooked projection (cross-attention)
                rows = x.numel() // max(x.shape[-1], 1)
                y = ColumnLinear.apply(x, b, self.group, self._schedule(rows, x), *ws)
        if self.gather_output:
            y = mappings.gather_from_tp(y, self.out_features, self.group)
        return y

    def _column_sp(self, x_shard: Tensor, ws: tuple[Tensor, ...], b: Tensor | None) -> tuple[Tensor, Tensor]:
        """(y, x_full): the sequence-parallel product and the gathered input, both in x_shard's layout."""
        x_shard, b, *ws = autocast_inputs(self._sequence_first(x_shard), b, *ws)
        rows = x_shard.numel() // max(x_shard.shape[-1], 1) * self.tp_size
        schedule = self._schedule(rows, x_shard)
        y, x_full = ColumnLinearSP.apply(x_shard, b, self.group, schedule, self.keep_gathered_input, *ws)
        if self.sequence_dim:
            y, x_full = y.movedim(0, self.sequence_dim), x_full.movedim(0, self.sequence_dim)
        return y, x_full


class SharedInputColumns:
    """Column-parallel layers that read the same input (q/k/v_proj, gate/up_proj) computed as one.

    The first of them called with an input x runs one GEMM over the concatenation of all their local
    weights, so x is all-gathered once under SP (instead of once per layer) and, backward, grad_x is
    all-reduced or reduce-scattered once; each layer gets its slice of the output. The concatenated
    weight is a copy made per GEMM (forward, and again in backward), never kept alive in between. The
    others, called next with the same x, take their slice. A layer called with another input, after x or
    any weight changed in place (an optimizer step; not seen inside a torch.compile graph), or under another
    grad / autocast mode, computes afresh.

    Args:
        layers: column-parallel layers with the same in_features, group, sequence parallelism, sequence dim
            and bias presence, none with gather_output.

    Raises:
        ValueError: layers that cannot share their input (`can_share`).

    Example:
        >>> SharedInputColumns([attn.q_proj, attn.k_proj, attn.v_proj]).attach()  # tpext.parallelize does this
        >>> q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)             # one GEMM (one gather under SP)
    """

    def __init__(self, layers: Sequence[ColumnParallelLinear]):
        if not self.can_share(layers):
            raise ValueError(
                "tpext.SharedInputColumns: the layers must share in_features, group, sequence "
                "parallelism and bias presence, without gather_output"
            )
        self.layers = list(layers)
        self._x: Tensor | None = None
        self._outputs: dict[int, Tensor] = {}
        self._state: tuple = ()

    @staticmethod
    def can_share(layers: Sequence[ColumnParallelLinear]) -> bool:
        first = layers[0]
        return all(
            layer.in_features == first.in_features
            and layer.group is first.group
            and layer.sequence_parallel == first.sequence_parallel
            and layer.sequence_dim == first.sequence_dim
            and (layer.bias is None) == (first.bias is None)
            and not layer.gather_output
            for layer in layers
        )

    def __deepcopy__(self, memo: dict) -> SharedInputColumns:
        # The copy shares nothing in flight: outputs kept for layers still to be called stay behind.
        new = SharedInputColumns.__new__(SharedInputColumns)
        memo[id(self)] = new
        new.layers = copy.deepcopy(self.layers, memo)
        new._x, new._outputs, new._state = None, {}, ()
        return new

    def _state_of(self, x: Tensor) -> tuple:
        """What the cached outputs depend on besides the identity of x."""
        tensors = [x] + [t for layer in self.layers for t in (layer.weight, layer.bias) if t is not None]
        try:
            # Not traced under torch.compile: there, an in-place change between the calls goes unseen.
            versions = () if torch.compiler.is_compiling() else tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors keep no version counter (and cannot change in place)
            versions = ()
        autocast = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type)
        return versions, torch.is_grad_enabled(), autocast

    def __call__(self, layer: ColumnParallelLinear, x: Tensor) -> Tensor:
        if x is self._x and id(layer) in self._outputs and self._state == self._state_of(x):
            out = self._outputs.pop(id(layer))
            if not self._outputs:
                self._x = None
            return out
        with self._scope():
            y = layer._column(x, *self._weights())
        return self._hand_out(y, x, skip=layer)[self.layers.index(layer)]

    def gather(self, x_shard: Tensor) -> Tensor:
        """Under SP: all-gather x_shard overlapped with the one GEMM of every layer, keep each layer's output
        for its call with the gathered input, and return that input, the full sequence, for code that takes
        shapes from it (Hugging Face attention does; tpext.parallel.sequence). Gradients that each rank sends into
        the returned tensor, from the layers or from other code, are partial: they are summed over the
        ranks (reduce-scatter) into x_shard's, the dual of the gather."""
        first = self.layers[0]
        if first.tp_size == 1 or not first.sequence_parallel:
            return x_shard
        first._check_features(x_shard, first.in_features, "in_features")
        with self._scope():
            y, x_full = first._column_sp(x_shard, *self._weights())
        self._hand_out(y, x_full, skip=None)
        return x_full

    def _weights(self) -> tuple[tuple[Tensor, ...], Tensor | None]:
        params = [layer._params() for layer in self.layers]
        b = torch.cat([p[1] for p in params]) if params[0][1] is not None else None
        return tuple(p[0] for p in params), b

    def _scope(self):
        names = "+".join(getattr(m, "_tpext_stats_name", type(m).__name__) for m in self.layers)
        return stats.module_scope(stats.current_module() or names)

    def _hand_out(self, y: Tensor, x: Tensor, skip: ColumnParallelLinear | None) -> list[Tensor]:
        """Split y into the layers' outputs and keep those of the layers still to be called with x."""
        outputs = y.split([m.local_weight_shape[0] for m in self.layers], dim=-1)
        self._outputs = {id(m): out for m, out in zip(self.layers, outputs) if m is not skip}
        # x is kept only while a layer's output waits for it (not beyond a lone layer's call)
        self._x, self._state = (x, self._state_of(x)) if self._outputs else (None, None)
        return list(outputs)

    def attach(self) -> SharedInputColumns:
        for layer in self.layers:
            layer._siblings = self
        return self


class RowParallelLinear(_ParallelLinear):
    """Linear layer ``y = x @ W.T + b`` with W [out_features, in_features] sharded by input features.

    Each rank holds weight [out, in/R] (split like the matching column layer's outputs) and the full,
    replicated bias [out], added once after the reduction. The reduction (an all-reduce, or with sequence
    parallelism a reduce-scatter along the sequence dim) is overlapped with the GEMM.

    Args:
        in_features: K, the dense input width, sharded over the group.
        out_features: N, the output width (not sharded).
        bias: whether the layer has a bias [N].
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        input_is_parallel: the input is already [*, K/R] (a column layer's output); False: it is [*, K]
            and this layer takes its own shard of it.
        sequence_parallel: reduce-scatter instead of all-reduce; the output is this rank's sequence shard.
        chunks: "auto" (`tpext.ops.auto_schedule`) or an int >= 1, the chunks of the overlapped ops.
        pieces: how the input features split into units, as the matching column layer's.
        sequence_dim: the sequence dim of the output's shard (0, or 1 for batch-first).
        device, dtype: of the parameters, as nn.Linear's.

    Shapes:
        input: [*, K/R] (input_is_parallel) or [*, K]. Output: [*, N], replicated, or [s/R, *, N] with
        sequence_parallel (s divisible by R).

    Raises:
        ValueError: an input of the wrong width or a sequence length not divisible by R; the message names
            the layer and what it expected.

    Example:
        >>> row = tpext.nn.RowParallelLinear.from_dense(nn.Linear(2048, 512))
        >>> y = row(col(x))  # [*, 512], the same on every rank
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group: GroupLike = None,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        chunks: Chunks = "auto",
        pieces: Sequence[Piece] | None = None,
        sequence_dim: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__(
            in_features,
            out_features,
            bias,
            group,
            1,
            sequence_parallel,
            chunks,
            device,
            dtype,
            pieces,
            sequence_dim,
        )
        if self.replicas > 1 or (self.packed and not input_is_parallel):
            raise ValueError(
                "tpext.RowParallelLinear: input features must be sharded, not replicated, and a "
                "packed input needs input_is_parallel=True"
            )
        self.input_is_parallel = input_is_parallel

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: GroupLike = None, **kwargs) -> RowParallelLinear:
        """Shard an nn.Linear: this rank keeps columns [start, start + in/R) of its weight, all the bias."""
        return cls._from_dense(linear, group, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        with stats.scope_for(self):
            if self.input_is_parallel:
                self._check_features(
                    x,
                    self.local_weight_shape[1],
                    f"this rank's shard of in_features={self.in_features} over "
                    f"{self.tp_size} ranks; is the preceding column-parallel layer on "
                    "another group or tensor-parallel size?",
                )
            else:
                self._check_features(x, self.in_features, "in_features")
                x = mappings.scatter_to_tp(x, self.group)
            w, b = self._params()
            if self.tp_size == 1:
                return F.linear(x, w, b)
            rows = x.numel() // max(x.shape[-1], 1)
            x, w, b = autocast_inputs(x, w, b)
            if self.sequence_parallel:
                x = self._sequence_first(x)
                self._check_sequence(x, x.shape[0])
                y = RowLinearSP.apply(x, w, b, self.group, self._schedule(rows, x))
                return y.movedim(0, self.sequence_dim) if self.sequence_dim else y
            # Small messages (decode): the P2P all-reduce instead of the overlapped NCCL one (tpext.p2p).
            algorithm = p2p.algorithm_for(x, self.group, nbytes=rows * self.out_features * x.element_size())
            if algorithm is not None:
                return RowLinearP2P.apply(x, w, b, self.group, algorithm)
            return RowLinear.apply(x, w, b, self.group, self._schedule(rows, x))


def __getattr__(name: str):
    """The Conv1D layers, defined in tpext.nn.conv1d, as they were importable from here before."""
    if name in ("ColumnParallelConv1D", "RowParallelConv1D"):
        from tpext.nn import conv1d

        return getattr(conv1d, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
