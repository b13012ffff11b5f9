"""Column- and row-parallel layers for Hugging Face's Conv1D (GPT-2's linear layers: y = x @ W + b, W
[in, out]), keeping Conv1D's weight orientation and names so state dicts and checkpoints read as the dense
model's."""

from __future__ import annotations

from torch import nn

from tpext.distributed import GroupLike
from tpext.nn.linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelConv1D", "RowParallelConv1D"]


class ColumnParallelConv1D(ColumnParallelLinear):
    """ColumnParallelLinear for a Hugging Face Conv1D (GPT-2's layers: y = x @ W + b, W [in, out]).

    The weight keeps Conv1D's orientation and name, so state dicts and checkpoints read as the dense
    model's: this rank holds weight [in, out/R] (or its columns of every piece) and bias [out/R]. The ops
    multiply by its transpose, a copy made per call.

    Args:
        As `ColumnParallelLinear`'s; made from a model's Conv1D with `from_dense`.

    Example:
        >>> attn.c_attn = ColumnParallelConv1D.from_dense(attn.c_attn, pieces=qkv_pieces)
    """

    transposed_weight = True

    @classmethod
    def from_dense(cls, conv1d: nn.Module, group: GroupLike = None, **kwargs) -> ColumnParallelConv1D:
        """Shard a Conv1D (weight [in, out]): this rank keeps its columns of the weight and its bias slice.

        Args:
            conv1d: the dense Conv1D, the same on every rank.
            group: ProcessGroup, 1-D DeviceMesh or None (the world group).
            **kwargs: ColumnParallelLinear's keyword arguments (gather_output, sequence_parallel, chunks,
                pieces, sequence_dim, keep_gathered_input).

        Returns:
            The sharded layer, on the Conv1D's device and dtype.

        Example:
            >>> block.attn.c_attn = ColumnParallelConv1D.from_dense(block.attn.c_attn, pieces=qkv_pieces)
        """
        return cls._from_dense(conv1d, group, **kwargs)


class RowParallelConv1D(RowParallelLinear):
    """RowParallelLinear for a Hugging Face Conv1D: this rank holds weight [in/R, out] (Conv1D's
    orientation, the dense names) and the full bias, added once after the reduction.

    Args:
        As `RowParallelLinear`'s; made from a model's Conv1D with `from_dense`.

    Example:
        >>> mlp.c_proj = RowParallelConv1D.from_dense(mlp.c_proj)
    """

    transposed_weight = True

    @classmethod
    def from_dense(cls, conv1d: nn.Module, group: GroupLike = None, **kwargs) -> RowParallelConv1D:
        """Shard a Conv1D (weight [in, out]): this rank keeps its rows of the weight, all the bias.

        Args and Returns as for `ColumnParallelConv1D.from_dense`, with RowParallelLinear's keyword arguments
        (input_is_parallel, sequence_parallel, chunks, pieces, sequence_dim).

        Example:
            >>> block.mlp.c_proj = RowParallelConv1D.from_dense(block.mlp.c_proj)
        """
        return cls._from_dense(conv1d, group, **kwargs)
