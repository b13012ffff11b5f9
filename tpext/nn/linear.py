"""Column- and row-parallel linear layers (Megatron layout), with and without sequence parallelism.

A Column -> Row pair is the tensor-parallel MLP (or attention projection): the column layer shards the
output features, the row layer shards its input features the same way, and only the row layer's output
is reduced. Without SP that is one all-reduce per forward (and one per backward, in the column layer's
dgrad); with SP the all-reduce becomes an all-gather before the column layer and a reduce-scatter after
the row layer, both overlapped with their GEMM. Uneven feature counts follow shard_sizes.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, resolve_group, shard_range
from tpext.nn._linear_functions import ColumnLinear, ColumnLinearSP, RowLinear, RowLinearSP
from tpext.planner import AlgorithmLike, Plan, resolve_chunks, resolve_plan

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]

Chunks = Union[int, str]


class _ParallelLinear(nn.Module):
    """What both layers share: the group, the local weight/bias, init, and the input checks."""

    #: Schedule of the overlapped ops (tpext.planner.Algorithm or "auto"); set on an instance to override
    #: the planner's choice, like the `chunks` argument overrides its chunk count.
    algorithm: AlgorithmLike = "auto"

    def __init__(self, in_features: int, out_features: int, bias: bool, group: GroupLike, sharded_dim: int,
                 sequence_parallel: bool, chunks: Chunks, device, dtype):
        super().__init__()
        self.group = resolve_group(group)
        self.tp_size, self.tp_rank = self.group.size(), self.group.rank()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        resolve_chunks(chunks, 1, 1)  # validate now, decide per call
        self.chunks = chunks
        full = (out_features, in_features)
        self.shard_start, local = shard_range(full[sharded_dim], self.tp_size, self.tp_rank)
        shape = (local, in_features) if sharded_dim == 0 else (out_features, local)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        # The column layer's bias is sharded with its outputs; the row layer's is replicated.
        self.bias = nn.Parameter(torch.empty(shape[0], **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's init, with the bound of the *full* layer (fan_in = in_features, not its shard).
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def _check_features(self, x: Tensor, want: int, what: str) -> None:
        if x.dim() < 1 or x.shape[-1] != want:
            raise ValueError(f"tpext.{type(self).__name__}: input must be [*, {want}] ({what}), got shape "
                             f"{tuple(x.shape)}")

    def _check_sequence(self, x: Tensor, rows: int) -> None:
        if x.dim() < 2:
            raise ValueError(f"tpext.{type(self).__name__}: with sequence_parallel the input must be "
                             f"[s, *, features] with the sequence in dim 0, got shape {tuple(x.shape)}")
        if rows % self.tp_size != 0:
            raise ValueError(f"tpext.{type(self).__name__}: sequence_parallel needs the sequence length "
                             f"(dim 0) divisible by the tensor-parallel size {self.tp_size}, got {rows} "
                             f"(input shape {tuple(x.shape)})")

    def _chunks(self, rows: int) -> Plan:
        """The (chunks, algorithm) plan the ops get for `rows` rows of GEMM output."""
        return resolve_plan(self.chunks, self.algorithm, rows, self.tp_size, self.weight.device.type)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tp={self.tp_rank}/{self.tp_size}, sequence_parallel={self.sequence_parallel}, "
                f"local weight={tuple(self.weight.shape)}")


class ColumnParallelLinear(_ParallelLinear):
    """y = x @ W.T + b with W [out_features, in_features] sharded by rows (output features).

    Each rank holds weight [out/R, in] and bias [out/R] (uneven R: ceil or floor of out/R).
    sequence_parallel=False: x is [*, in], replicated; the output is [*, out/R] (this rank's features),
    or [*, out] with gather_output=True. Backward all-reduces grad_x, overlapped with its GEMM.
    sequence_parallel=True: x is this rank's sequence shard [s/R, *, in]; the forward all-gathers the
    sequence overlapped with the GEMM and returns [s, *, out/R]; backward reduce-scatters grad_x.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: GroupLike = None,
                 gather_output: bool = False, sequence_parallel: bool = False, chunks: Chunks = "auto",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, group, 0, sequence_parallel, chunks, device, dtype)
        self.gather_output = gather_output

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: GroupLike = None, **kwargs) -> "ColumnParallelLinear":
        """Shard an nn.Linear: this rank keeps rows [start, start + out/R) of its weight and bias."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group=group,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        rows = slice(layer.shard_start, layer.shard_start + layer.weight.shape[0])
        with torch.no_grad():
            layer.weight.copy_(linear.weight[rows])
            if layer.bias is not None:
                layer.bias.copy_(linear.bias[rows])
        return layer

    def forward(self, x: Tensor) -> Tensor:
        self._check_features(x, self.in_features, "in_features")
        with stats.module_scope(stats.current_module() or type(self).__name__):
            if self.tp_size == 1:
                return F.linear(x, self.weight, self.bias)
            if self.sequence_parallel:  # x is a sequence shard: any length gathers to R times it
                rows = x.numel() // max(x.shape[-1], 1) * self.tp_size
                y = ColumnLinearSP.apply(x, self.weight, self.bias, self.group, self._chunks(rows))
            else:
                rows = x.numel() // max(x.shape[-1], 1)
                y = ColumnLinear.apply(x, self.weight, self.bias, self.group, self._chunks(rows))
            if self.gather_output:
                y = mappings.gather_from_tp(y, self.out_features, self.group)
            return y


class RowParallelLinear(_ParallelLinear):
    """y = x @ W.T + b with W [out_features, in_features] sharded by columns (input features).

    Each rank holds weight [out, in/R] (split like the matching column layer's outputs) and the full,
    replicated bias [out], added once after the reduction.
    input_is_parallel=True: x is [*, in/R] (a column layer's output); False: x is [*, in] and this
    layer keeps its own shard of it. sequence_parallel=False: all-reduce overlapped with the GEMM, output
    [*, out], replicated. sequence_parallel=True: reduce-scatter along dim 0 instead, output this rank's
    sequence shard [s/R, *, out] (dim 0 of x must be divisible by R).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: GroupLike = None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, chunks: Chunks = "auto",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, group, 1, sequence_parallel, chunks, device, dtype)
        self.input_is_parallel = input_is_parallel

    @classmethod
    def from_dense(cls, linear: nn.Linear, group: GroupLike = None, **kwargs) -> "RowParallelLinear":
        """Shard an nn.Linear: this rank keeps columns [start, start + in/R) of its weight, all the bias."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group=group,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        cols = slice(layer.shard_start, layer.shard_start + layer.weight.shape[1])
        with torch.no_grad():
            layer.weight.copy_(linear.weight[:, cols])
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        with stats.module_scope(stats.current_module() or type(self).__name__):
            if self.input_is_parallel:
                self._check_features(x, self.weight.shape[1],
                                     f"this rank's shard of in_features={self.in_features} over "
                                     f"{self.tp_size} ranks; is the preceding column-parallel layer on "
                                     "another group or tensor-parallel size?")
            else:
                self._check_features(x, self.in_features, "in_features")
                x = mappings.scatter_to_tp(x, self.group)
            if self.tp_size == 1:
                return F.linear(x, self.weight, self.bias)
            rows = x.numel() // max(x.shape[-1], 1)
            if self.sequence_parallel:
                self._check_sequence(x, x.shape[0])
                return RowLinearSP.apply(x, self.weight, self.bias, self.group, self._chunks(rows))
            return RowLinear.apply(x, self.weight, self.bias, self.group, self._chunks(rows))
