"""Tensor-parallel modules: drop-in replacements for nn.Linear / nn.Embedding / norms."""

from tpext.nn import functional
from tpext.nn.embedding import VocabParallelEmbedding
from tpext.nn.experts import shard_experts
from tpext.nn.linear import ColumnParallelLinear, RowParallelLinear, SharedInputColumns
from tpext.nn.norm import (
    ColumnParallelRMSNorm,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    shard_norm_features,
    sum_param_grads,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SharedInputColumns",
    "VocabParallelEmbedding",
    "SequenceParallelLayerNorm",
    "SequenceParallelRMSNorm",
    "ColumnParallelRMSNorm",
    "sum_param_grads",
    "shard_norm_features",
    "shard_experts",
    "functional",
]
