"""Tensor-parallel modules: drop-in replacements for nn.Linear / nn.Embedding / norms."""

from tpext.nn import functional
from tpext.nn.column_norm import ColumnParallelRMSNorm, shard_norm_features
from tpext.nn.conv1d import ColumnParallelConv1D, RowParallelConv1D
from tpext.nn.embedding import VocabParallelEmbedding
from tpext.nn.experts import shard_experts
from tpext.nn.linear import ColumnParallelLinear, RowParallelLinear, SharedInputColumns
from tpext.nn.norm import SequenceParallelLayerNorm, SequenceParallelRMSNorm, sum_param_grads

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SharedInputColumns",
    "ColumnParallelConv1D",
    "RowParallelConv1D",
    "VocabParallelEmbedding",
    "SequenceParallelLayerNorm",
    "SequenceParallelRMSNorm",
    "ColumnParallelRMSNorm",
    "sum_param_grads",
    "shard_norm_features",
    "shard_experts",
    "functional",
]
