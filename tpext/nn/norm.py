"""Sequence-parallel LayerNorm and RMSNorm.

Under sequence parallelism each rank normalises only its sequence shard, but the weights are replicated:
every rank's weight gradient covers only its tokens, so the gradients must be summed over the group.
These modules do that themselves (the weights pass through copy_to_tp, whose backward all-reduces), so
the replicas stay identical without any hook or step for the user to remember. `sum_param_grads` gives
any existing norm module (a model's own class, with its own arithmetic) the same gradient rule.
"""

from __future__ import annotations

import threading
from typing import Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group
from tpext.nn._class_swap import derived_class

__all__ = ["SequenceParallelLayerNorm", "SequenceParallelRMSNorm", "sum_param_grads"]

Shape = Union[int, Sequence[int]]


class _SPNorm(SharesGroupOnCopy, nn.Module):
    def __init__(self, normalized_shape: Shape, eps: float, bias: bool, group: GroupLike, sequence_parallel: bool,
                 device, dtype):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.group = resolve_group(group)
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype)) if bias else None

    def _params(self):
        """The weights as this forward uses them: gradients summed over the group under SP."""
        if not self.sequence_parallel:
            return self.weight, self.bias
        w = mappings.copy_to_tp(self.weight, self.group)
        b = mappings.copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return w, b

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, bias={self.bias is not None}, "
                f"sequence_parallel={self.sequence_parallel}")


class SequenceParallelLayerNorm(_SPNorm):
    """nn.LayerNorm over a sequence shard, with weight/bias gradients all-reduced over the group."""

    def __init__(self, normalized_shape: Shape, eps: float = 1e-5, bias: bool = True, *, group: GroupLike = None,
                 sequence_parallel: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps, bias, group, sequence_parallel, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        with stats.scope_for(self):
            w, b = self._params()
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class SequenceParallelRMSNorm(_SPNorm):
    """RMSNorm (x / rms(x) * weight) over a sequence shard, weight gradient all-reduced over the group."""

    def __init__(self, normalized_shape: Shape, eps: float = 1e-6, *, group: GroupLike = None,
                 sequence_parallel: bool = True, device=None, dtype=None):
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
    with the module's own parameters read through copy_to_tp, so their gradients are summed over the
    group. Whatever the module computes (Hugging Face's RMSNorm in fp32, Gemma's (1 + weight), Cohere's
    mean-centred norm) stays exactly as it was; only the gradients change. A parameter that a wrapper
    keeps as a plain tensor attribute during forward (FSDP1's views) is read through copy_to_tp too."""

    _tpext_group: dist.ProcessGroup
    _tpext_param_names: tuple[str, ...]

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # the graph inlines the swap as functional ops: nothing shared changes
            return self._forward_swapped(args, kwargs)
        with _SWAP_LOCK, stats.scope_for(self):
            return self._forward_swapped(args, kwargs)

    def _forward_swapped(self, args: tuple, kwargs: dict):
        swapped = []  # (where the tensor lives, name, the tensor, its stand-in)
        try:
            for name in self._tpext_param_names:
                # Where `self.<name>` reads from: the instance dict first (a wrapper's plain tensor).
                where = self.__dict__ if isinstance(self.__dict__.get(name), Tensor) else self._parameters
                tensor = where.get(name)
                if isinstance(tensor, Tensor):
                    stand_in = mappings.copy_to_tp(tensor, self._tpext_group)
                    where[name] = stand_in
                    swapped.append((where, name, tensor, stand_in))
            return super().forward(*args, **kwargs)
        finally:
            for where, name, tensor, stand_in in swapped:
                if where.get(name) is stand_in:  # unless the forward itself replaced it
                    where[name] = tensor

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        return f"{inner}{', ' if inner else ''}grads summed over tp={self._tpext_group.size()}"


def sum_param_grads(module: nn.Module, group: GroupLike = None) -> nn.Module:
    """Make `module` (in place, and return it) sum the gradients of its own parameters over `group`: for a
    module with replicated weights that each rank applies to different tokens (a norm under sequence
    parallelism) or to different heads (a per-head q/k norm). Names, state dict and arithmetic are
    unchanged; `isinstance` still holds. A group of size 1 leaves the module as it is."""
    pg = resolve_group(group)
    if pg.size() == 1 or isinstance(module, _SumsParamGrads):
        return module
    module.__class__ = derived_class(type(module), _SumsParamGrads, wraps=True)
    module._tpext_group = pg
    module._tpext_param_names = tuple(name for name, _ in module.named_parameters(recurse=False))
    return module
