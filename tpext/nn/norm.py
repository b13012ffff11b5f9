"""Sequence-parallel LayerNorm and RMSNorm.

Under sequence parallelism each rank normalises only its sequence shard, but the weights are replicated:
every rank's weight gradient covers only its tokens, so the gradients must be summed over the group.
These modules do that themselves (the weights pass through copy_to_tp, whose backward all-reduces), so
the replicas stay identical without any hook or step for the user to remember.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group

__all__ = ["SequenceParallelLayerNorm", "SequenceParallelRMSNorm"]

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
