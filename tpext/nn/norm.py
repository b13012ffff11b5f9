"""Norms with replicated weights: sequence-parallel LayerNorm / RMSNorm, and the gradient rule for any
module's replicated weights (`sum_param_grads`).

Under sequence parallelism each rank normalises only its tokens while the weights are replicated, so the
weight gradients are summed over the group in backward (the weights pass through copy_to_tp). Norms over
column-sharded features are in tpext.nn.column_norm; docs/modules.md says which models' norms take which path.
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
from tpext.nn.class_swap import derived_class
from tpext.sharding import get_layout

__all__ = ["SequenceParallelLayerNorm", "SequenceParallelRMSNorm", "sum_param_grads"]

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


def __getattr__(name: str):
    """The norms over column-sharded features, defined in tpext.nn.column_norm, as they were importable
    from here before."""
    if name in ("ColumnParallelRMSNorm", "shard_norm_features"):
        from tpext.nn import column_norm

        return getattr(column_norm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
