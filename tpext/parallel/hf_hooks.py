"""What tpext.parallelize attaches to a model for the contracts of Hugging Face's models.

For a model that computes its own loss from labels (`loss_function`), a causal-LM loss on the
vocabulary-sharded logits of a vocab-parallel lm_head; for a model with `save_pretrained`, one that writes
the dense model; for attention with per-head position biases (ALiBi: BLOOM's, MPT's), this rank's heads'
slice of them.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext.nn import ColumnParallelLinear
from tpext.nn.functional import vocab_parallel_cross_entropy
from tpext.parallel.structure import LM_HEADS
from tpext.sharding import gather_state_dict

__all__ = ["add_causal_lm_loss", "add_dense_save_pretrained", "add_alibi_slices"]


class _VocabParallelCausalLMLoss:
    """Hugging Face's causal-LM loss contract (labels shifted left by one and padded with ignore_index,
    mean over the counted tokens, or sum / num_items_in_batch), computed on the vocabulary-sharded
    logits of a vocab-parallel lm_head by vocab_parallel_cross_entropy, never gathering [tokens, V]."""

    def __init__(self, lm_head: ColumnParallelLinear):
        self.lm_head = lm_head

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **_: object,
    ) -> Tensor:
        if vocab_size is not None and vocab_size != self.lm_head.out_features:
            raise ValueError(
                f"tpext: the loss was asked for a vocabulary of {vocab_size}, but the vocab-parallel "
                f"lm_head has {self.lm_head.out_features} outputs"
            )
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = vocab_parallel_cross_entropy(
            logits.float(),
            shift_labels.to(logits.device),
            group=self.lm_head.group,
            ignore_index=ignore_index,
            reduction=reduction,
            vocab_size=self.lm_head.out_features,
        )
        if num_items_in_batch is not None:
            loss = loss / (
                num_items_in_batch.to(loss.device)
                if isinstance(num_items_in_batch, Tensor)
                else num_items_in_batch
            )
        return loss


# Hugging Face's loss types whose loss is the shifted causal-LM cross entropy (its LOSS_MAPPING).
_CAUSAL_LOSS_TYPES = ("ForCausalLM", "ForConditionalGeneration")


def add_causal_lm_loss(model: nn.Module, converted: dict[str, nn.Module]) -> None:
    """A model that computes its loss from labels through a settable `loss_function` (Hugging Face's
    PreTrainedModel) gets one that understands the vocabulary-sharded logits of its lm_head; its own would
    read [*, V/R] logits as [*, V] and be wrong."""
    head = next((converted[n] for n in LM_HEADS if n in converted), None)
    prop = getattr(type(model), "loss_function", None)
    # Not a masked-LM or other head's loss; None: Hugging Face falls back to the causal-LM loss (GPT-2's).
    causal = getattr(model, "loss_type", None) in (*_CAUSAL_LOSS_TYPES, None)
    if (
        isinstance(head, ColumnParallelLinear)
        and not head.gather_output
        and head.tp_size > 1
        and causal
        and isinstance(prop, property)
        and prop.fset is not None
    ):
        model.loss_function = _VocabParallelCausalLMLoss(head)


def add_dense_save_pretrained(model: nn.Module) -> None:
    """A model with Hugging Face's `save_pretrained` gets one that saves the dense model (what
    from_pretrained loads at any tensor-parallel size, or without tensor parallelism) instead of each rank's
    shards under the dense names."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_save_pretrained_dense, model)


def _save_pretrained_dense(
    self: nn.Module,
    save_directory,
    *args,
    is_main_process: bool | None = None,
    state_dict: dict | None = None,
    **kwargs,
):
    """Hugging Face's save_pretrained of the dense model: the state dict is gathered over the tensor-parallel
    groups (collective: every rank calls it) and global rank 0 writes it, with the model's config, unless
    is_main_process says otherwise."""

    if state_dict is not None:
        raise ValueError(
            "tpext: save_pretrained of a tensor-parallel model gathers the dense state dict itself; "
            "pass no state_dict (or call type(model).save_pretrained with a dense one)"
        )
    dense = gather_state_dict(self)
    if is_main_process is None:
        is_main_process = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    return type(self).save_pretrained(
        self, save_directory, *args, is_main_process=is_main_process, state_dict=dense, **kwargs
    )


class _SliceAlibi:
    """Forward pre-hook of an attention module with per-head position biases (ALiBi) whose heads are sharded:
    the model builds the biases of all heads, BLOOM's `alibi` [batch * heads, 1, keys] batch-major, MPT's
    `position_bias` [heads, 1, keys]; this rank's heads take their own."""

    def __init__(self, argument: str, heads: int, start: int, count: int, name: str):
        self.argument, self.heads, self.start, self.count, self.name = argument, heads, start, count, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        bias = kwargs.get(self.argument)
        if bias is None:
            if self.argument in kwargs:  # the model runs without position biases
                return None
            raise TypeError(
                f"tpext.parallelize: {self.name} takes position biases for all heads; tpext gives it "
                f"its heads' slice, and needs them passed as {self.argument}= (as Hugging Face's "
                "models do)"
            )
        if self.argument == "alibi" and bias.shape[0] % self.heads == 0:  # [batch * heads, ...], batch-major
            rows, *rest = bias.shape
            mine = bias.reshape(rows // self.heads, self.heads, *rest)[
                :, self.start : self.start + self.count
            ]
            return args, {**kwargs, self.argument: mine.reshape(-1, *rest)}
        if bias.dim() >= 3 and bias.shape[-3] == self.heads:  # [heads, q, k] or [batch, heads, q, k]
            return args, {**kwargs, self.argument: bias.narrow(-3, self.start, self.count)}
        raise ValueError(
            f"tpext.parallelize: {self.name}: {self.argument} of shape {tuple(bias.shape)} has no "
            f"dim of its {self.heads} heads where tpext looks for it; parallelize its MLPs only"
        )


def add_alibi_slices(model: nn.Module, alibi: dict[str, tuple[str, int, int, int]]) -> None:
    """Every attention module in `alibi` gets its heads' position biases: alibi[name] = (argument, all
    heads, first head of this rank, heads of this rank)."""
    for name, (argument, heads, start, count) in alibi.items():
        hook = _SliceAlibi(argument, heads, start, count, name or "model")
        model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
