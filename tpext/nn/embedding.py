"""Vocabulary-parallel embedding: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group, shard_range
from tpext.nn.class_swap import derived_class, shell_copy
from tpext.sharding import ShardLayout, set_layout

__all__ = ["VocabParallelEmbedding", "vocab_parallel_subclass"]


class VocabParallelEmbedding(SharesGroupOnCopy, nn.Module):
    """nn.Embedding with the vocabulary split over the group (ceil or floor of V/R rows per rank).

    Each rank looks up the ids that fall in its slice (others give zeros), then the partial embeddings are
    summed: an all-reduce (output replicated), or with sequence parallelism a reduce-scatter along the
    sequence dim (output this rank's sequence shard).

    Args:
        num_embeddings: V, the vocabulary size, sharded over the group.
        embedding_dim: the embedding width (not sharded).
        padding_idx: as nn.Embedding's (its row gets no gradient).
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        sequence_parallel: reduce-scatter the output along `sequence_dim` (s divisible by R).
        sequence_dim: 0 for ids [s, *], 1 for batch-first ids [b, s].
        device, dtype: of the weight, as nn.Embedding's.

    Shapes:
        ids: [*] in [0, V). Output: [*, dim]; with sequence_parallel [s/R, *, dim], or [b, s/R, dim] with
        sequence_dim=1.

    Raises:
        IndexError: an id outside [0, V) (the message gives the range and the min/max seen).
        ValueError: a sequence length not divisible by R.

    Example:
        >>> emb = tpext.nn.VocabParallelEmbedding.from_dense(model.embed_tokens)
        >>> h = emb(input_ids)  # [*, dim], replicated
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        group: GroupLike = None,
        sequence_parallel: bool = False,
        sequence_dim: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(
                f"tpext.VocabParallelEmbedding: padding_idx must be in [-{num_embeddings}, "
                f"{num_embeddings}), got {padding_idx}"
            )
        self.group = resolve_group(group)
        self.tp_size, self.tp_rank = self.group.size(), self.group.rank()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.vocab_start, local = shard_range(num_embeddings, self.tp_size, self.tp_rank)
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        set_layout(
            self, "weight", ShardLayout((num_embeddings, embedding_dim), 0, ((self.vocab_start, local),))
        )
        self.reset_parameters()

    @property
    def _local_padding_idx(self) -> int | None:
        if self.padding_idx is not None and self.vocab_start <= self.padding_idx < self.vocab_end:
            return self.padding_idx - self.vocab_start
        return None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_()
            if self._local_padding_idx is not None:
                self.weight[self._local_padding_idx].zero_()

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group: GroupLike = None, **kwargs) -> VocabParallelEmbedding:
        """Shard an nn.Embedding: this rank keeps rows [vocab_start, vocab_end) of its weight.

        Args:
            embedding: the dense embedding, the same on every rank (on the meta device: the layer stays
                there, to be loaded from a checkpoint).
            group: ProcessGroup, 1-D DeviceMesh or None (the world group).
            **kwargs: the constructor's keyword arguments (sequence_parallel, sequence_dim).

        Returns:
            A VocabParallelEmbedding with `embedding`'s padding_idx, dtype and device and this rank's rows
            of its weight.

        Example:
            >>> emb = tpext.nn.VocabParallelEmbedding.from_dense(model.embed_tokens, sequence_parallel=True)
        """
        # On the meta device first: no init, so no RNG draws that depend on this rank's vocabulary share.
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            embedding.padding_idx,
            group=group,
            device="meta",
            dtype=embedding.weight.dtype,
            **kwargs,
        )
        if not embedding.weight.is_meta:  # a meta-device model is loaded later, from a checkpoint
            layer.to_empty(device=embedding.weight.device)
            with torch.no_grad():
                layer.weight.copy_(embedding.weight[layer.vocab_start : layer.vocab_end])
        return layer

    def _check_ids(self, ids: Tensor) -> None:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tpext.VocabParallelEmbedding: ids must be int32/int64, got {ids.dtype}")
        # A host-side range check (CPU only: on CUDA it would synchronise; skipped under torch.compile,
        # where it would be a data-dependent branch).
        if (
            ids.device.type == "cpu"
            and ids.numel()
            and not torch.compiler.is_compiling()
            and (ids.min() < 0 or ids.max() >= self.num_embeddings)
        ):
            raise IndexError(
                f"tpext.VocabParallelEmbedding: ids must be in [0, {self.num_embeddings}), got "
                f"min {ids.min().item()} max {ids.max().item()}"
            )

    def forward(self, ids: Tensor) -> Tensor:
        self._check_ids(ids)
        if self.sequence_parallel and (
            ids.dim() <= self.sequence_dim or ids.shape[self.sequence_dim] % self.tp_size
        ):
            raise ValueError(
                f"tpext.VocabParallelEmbedding: sequence_parallel needs the sequence length (dim "
                f"{self.sequence_dim}) divisible by the tensor-parallel size {self.tp_size}, got ids "
                f"of shape {tuple(ids.shape)}"
            )
        with stats.scope_for(self):
            if self.tp_size == 1:
                return F.embedding(ids, self.weight, self.padding_idx)
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            partial = F.embedding(local_ids, self.weight, self._local_padding_idx)
            partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
            if self.sequence_parallel:
                return mappings.reduce_scatter_to_sequence(partial, self.group, dim=self.sequence_dim)
            return mappings.reduce_from_tp(partial, self.group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"tp={self.tp_rank}/{self.tp_size}, vocab=[{self.vocab_start}, {self.vocab_end}), "
            f"sequence_parallel={self.sequence_parallel}"
        )


class _VocabParallelLookup(SharesGroupOnCopy, nn.Embedding):
    """Stands in for nn.Embedding's lookup under a subclass of it (vocab_parallel_subclass): the
    subclass's forward runs as written and its super().forward() is VocabParallelEmbedding's.
    padding_idx is the local row of the padding token (None where another rank holds it), as code that
    initialises `weight[padding_idx]` needs."""

    forward = VocabParallelEmbedding.forward
    _check_ids = VocabParallelEmbedding._check_ids
    reset_parameters = VocabParallelEmbedding.reset_parameters
    extra_repr = VocabParallelEmbedding.extra_repr

    @property
    def _local_padding_idx(self) -> int | None:
        return self.padding_idx


class _LookupCalled(Exception):
    pass


class _ProbeLookup(nn.Embedding):
    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's name
        raise _LookupCalled


def vocab_parallel_subclass(embedding: nn.Embedding, group: GroupLike = None, **kwargs) -> nn.Embedding:
    """A vocabulary-parallel copy of an instance of an nn.Embedding subclass whose forward adds to the lookup
    (e.g. ``super().forward(ids) * scale``).

    The copy is of the same class, with this rank's rows of the weight; its forward runs the subclass's code
    around VocabParallelEmbedding's lookup and reduction. Names, buffers and isinstance are kept.

    Args:
        embedding: the dense module, an instance of a subclass of nn.Embedding.
        group: ProcessGroup, 1-D DeviceMesh or None (the world group).
        **kwargs: as for VocabParallelEmbedding.from_dense (sequence_parallel, sequence_dim).

    Returns:
        The sharded copy; `embedding` is left unchanged.

    Raises:
        ValueError: the subclass's forward fails on ids alone, or does not look up through
            nn.Embedding.forward (it would index this rank's rows with global ids); the message names the
            class.

    Example:
        >>> from tpext.nn.embedding import vocab_parallel_subclass
        >>> model.embed_tokens = vocab_parallel_subclass(model.embed_tokens, sequence_parallel=True)
    """
    cls = type(embedding)
    name = f"{cls.__name__}.forward"
    probe = shell_copy(embedding)
    probe.__class__ = derived_class(cls, _ProbeLookup, wraps=False)
    try:
        probe.forward(torch.zeros(1, 1, dtype=torch.long, device=embedding.weight.device))  # no hooks
        reached = False
    except _LookupCalled:
        reached = True
    except Exception as exc:
        raise ValueError(
            f"tpext: cannot shard the vocabulary of a {cls.__name__}: calling {name} with ids "
            f"alone failed ({type(exc).__name__}: {exc})"
        ) from exc
    if not reached:
        raise ValueError(
            f"tpext: cannot shard the vocabulary of a {cls.__name__}: {name} does not look up "
            "through nn.Embedding.forward (super().forward), so it would index this rank's rows "
            "with global ids; keep it replicated"
        )
    lookup = VocabParallelEmbedding.from_dense(embedding, group, **kwargs)
    new = shell_copy(embedding)
    new.__class__ = derived_class(cls, _VocabParallelLookup, wraps=False)
    for attr in (
        "group",
        "tp_size",
        "tp_rank",
        "vocab_start",
        "vocab_end",
        "sequence_parallel",
        "sequence_dim",
    ):
        new.__dict__[attr] = getattr(lookup, attr)
    new.__dict__["padding_idx"] = lookup._local_padding_idx
    new._parameters["weight"] = lookup.weight
    set_layout(new, "weight", lookup._tpext_layouts["weight"])
    return new
