"""Tensor-parallel modules: drop-in replacements for nn.Linear / nn.Embedding / norms."""

from tpext.nn import functional
from tpext.nn.embedding import VocabParallelEmbedding
from tpext.nn.linear import ColumnParallelLinear, RowParallelLinear
from tpext.nn.norm import SequenceParallelLayerNorm, SequenceParallelRMSNorm

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "SequenceParallelLayerNorm", "SequenceParallelRMSNorm", "functional",
]
