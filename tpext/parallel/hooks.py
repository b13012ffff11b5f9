"""What tpext.parallelize attaches to a model besides its converted modules.

Under sequence parallelism, two forward pre-hooks:
  * the first decoder layer splits the sequence (`_SplitSequence`): the embedding and the model-level
    code that derives positions and the causal mask from its output's shape see the full sequence, as
    in the dense model; the layers see this rank's shard;
  * each sharded attention module gathers it back (`_GatherSequence`), overlapped with the q/k/v GEMM,
    so attention code that takes the sequence length from its input sees the dense shapes;
  * each mixture-of-experts block runs on the full sequence (`_FullSequenceBlock`) and returns this
    rank's shard.
And for models that compute their own loss from labels (Hugging Face's `loss_function`), a causal-LM
loss on the vocabulary-sharded logits of a vocab-parallel lm_head; for models with Hugging Face's
`save_pretrained`, one that writes the dense model.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import SharesGroupOnCopy
from tpext.nn import ColumnParallelLinear, SharedInputColumns
from tpext.nn.functional import vocab_parallel_cross_entropy
from tpext.parallel.structure import ATTENTION_INPUTS, LM_HEADS
from tpext.sharding import gather_state_dict

__all__ = ["add_sequence_hooks", "add_causal_lm_loss", "add_dense_save_pretrained", "add_alibi_slices"]


def _hidden_states(module: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Callable[[Tensor], tuple]]:
    """The activation a decoder layer or attention module is called with (its first positional argument,
    or hidden_states=), and how to call it with another one instead."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], lambda x: (args, {**kwargs, "hidden_states": x})
    raise TypeError(
        f"tpext.parallelize: under sequence parallelism {type(module).__name__} must be called with "
        "its activations as the first positional argument or as hidden_states="
    )


class _SplitSequence(SharesGroupOnCopy):
    """Forward pre-hook of the first decoder layer under SP: from here on activations are this rank's
    sequence shard (the dual of the split, an all-gather, runs in backward)."""

    def __init__(self, group, sequence_dim: int, name: str):
        self.group, self.sequence_dim, self.name = group, sequence_dim, name

    #: The shape of the last shard this hook made (what _GatherStackOutput recognises as a shard).
    shard_shape: torch.Size | None = None
    #: Whether the sequence has been split in the current forward of the stack's owner (_StartForward resets it).
    done: bool = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, call_with = _hidden_states(module, args, kwargs)
        world, dim = self.group.size(), self.sequence_dim
        if x.dim() <= dim or x.shape[dim] % world:
            raise ValueError(
                f"tpext.parallelize: sequence_parallel needs the sequence length (dim {dim}) divisible "
                f"by the tensor-parallel size {world}, got hidden states of shape {tuple(x.shape)}"
            )
        with stats.module_scope(stats.current_module() or self.name):  # its backward's all-gather counts here
            shard = mappings.scatter_to_sequence(x, self.group, dim=dim)
        self.shard_shape, self.done = shard.shape, True
        return call_with(shard)


class _StartForward:
    """Forward pre-hook of the decoder stack's owner: a new forward, in which the sequence is not split yet."""

    def __init__(self, split: _SplitSequence):
        self.split = split

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.split.done = False


class _CheckRunsOnShards:
    """Forward pre-hook of a module that parallelize converted for sequence shards because it is registered
    after the decoder layers (a norm whose gradients are summed over the group, a sequence-parallel head): it
    must also run after the split. One registered there but called before the layers (BART's
    layernorm_embedding) sees the whole sequence on every rank, and summing its gradients would count them
    once per rank; that is an error, not a wrong gradient."""

    def __init__(self, split: _SplitSequence, name: str):
        self.split, self.name = split, name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.split.done:
            raise ValueError(
                f"tpext.parallelize: {self.name} runs before the sequence is split at {self.split.name} "
                "(it is registered after the decoder layers but called before them), so under "
                "sequence_parallel=True it sees the whole sequence on every rank, where it was "
                "converted for sequence shards (a norm's gradients summed over the group would be "
                "counted once per rank); parallelize with sequence_parallel=False, or plan "
                f"{self.name!r} as 'replicate'"
            )


class _GatherSequence(SharesGroupOnCopy):
    """Forward pre-hook of an attention module under SP: the module is called with the full sequence, so
    attention code that takes the sequence length from its input (Hugging Face's does) sees the dense
    shapes; o_proj reduce-scatters its output back to a shard. With q/k/v in one SharedInputColumns (or
    one packed qkv_proj) the gather is overlapped with their one GEMM (SharedInputColumns.gather);
    otherwise a plain all-gather, and each projection multiplies the gathered sequence locally."""

    def __init__(self, columns: list[ColumnParallelLinear], shared: SharedInputColumns | None, name: str):
        self.shared, self.name = shared, name
        self.group, self.sequence_dim = columns[0].group, columns[0].sequence_dim
        self._gathered: weakref.ref | None = None
        for layer in columns:
            layer._is_gathered_input = self.is_gathered

    def is_gathered(self, x: Tensor) -> bool:
        """Whether x is the sequence this hook gathered last (a projection called with another tensor, such
        as cross-attention's memory, treats it as a replicated input of its own)."""
        return self._gathered is not None and self._gathered() is x

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, call_with = _hidden_states(module, args, kwargs)
        if self.shared is not None:
            x_full = self.shared.gather(x)
        else:
            with stats.module_scope(stats.current_module() or self.name):
                x_full = mappings.gather_from_sequence(x, self.group, dim=self.sequence_dim)
        self._gathered = weakref.ref(x_full)
        return call_with(x_full)


class _FullSequenceBlock(SharesGroupOnCopy):
    """Forward pre-hook and hook of a mixture-of-experts block under SP. Its experts (and a shared expert)
    hold a slice of every token's features, so every rank needs every token: the block runs on the full
    sequence, replicated on every rank (its router routes it as the dense model does, its experts reduce
    their own output), and returns this rank's shard. Everything in the block reads the gathered input
    alike on every rank, so the gather's backward keeps this rank's block of the gradient; the split's
    backward all-gathers. (An all-reduce and an all-gather where a reduce-scatter would do: the price of
    running the block's own code unchanged.)"""

    def __init__(self, group, sequence_dim: int, name: str):
        self.group, self.sequence_dim, self.name = group, sequence_dim, name
        self._shape = None

    def gather(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, call_with = _hidden_states(module, args, kwargs)
        with stats.module_scope(stats.current_module() or f"{self.name}.gather"):
            x_full = mappings.gather_from_sequence(x, self.group, self.sequence_dim, replicated_grad=True)
        self._shape = x_full.shape
        return call_with(x_full.contiguous())  # the block's code may view() it

    def _scatter(self, out: Tensor) -> Tensor:
        # A block that returns its tokens flattened (Llama 4's [b * s, h]) gets them back in its input's
        # shape first, so the split cuts the sequence and not the features.
        if self._shape is not None and out.shape != self._shape and out.numel() == self._shape.numel():
            out = out.reshape(self._shape)
        return mappings.scatter_to_sequence(out, self.group, self.sequence_dim)

    def split(self, module: nn.Module, args: tuple, output):
        with stats.module_scope(stats.current_module() or f"{self.name}.split"):
            if isinstance(output, Tensor):
                return self._scatter(output)
            if (
                isinstance(output, tuple) and output and isinstance(output[0], Tensor)
            ):  # (hidden states, router logits)
                return (self._scatter(output[0]), *output[1:])
        raise TypeError(
            f"tpext.parallelize: under sequence parallelism the mixture-of-experts block {self.name} must "
            f"return its hidden states (or a tuple starting with them), got {type(output).__name__}"
        )


class _GatherStackOutput(SharesGroupOnCopy):
    """Forward hook of the module that owns the decoder stack (Hugging Face's LlamaModel), for models with
    no sequence-parallel head after it (a base model, a classification or QA head with replicated
    weights): the sequence shards in its output (last_hidden_state, and hidden_states when asked for)
    are all-gathered back to the full sequence, so what reads them sees the dense shapes. Their readers
    compute the same thing on every rank, so backward keeps each rank's block of the gradient."""

    def __init__(self, split: _SplitSequence, name: str):
        self.split, self.name = split, name
        self.group, self.sequence_dim = split.group, split.sequence_dim

    def _gather(self, value):
        if isinstance(value, Tensor):
            if value.shape == self.split.shard_shape and value.is_floating_point():
                return mappings.gather_from_sequence(
                    value, self.group, self.sequence_dim, replicated_grad=True
                )
            return value
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            return type(value)(self._gather(v) for v in value)
        if isinstance(
            value, dict
        ):  # Hugging Face's ModelOutput is an ordered dict (setting an item sets the field)
            last = value.get("last_hidden_state")
            if (
                isinstance(last, Tensor)
                and self.split.shard_shape is not None
                and last.shape != self.split.shard_shape
            ):
                raise ValueError(
                    f"tpext.parallelize: under sequence parallelism {self.name.rpartition('.')[0]} must "
                    f"return its decoder stack's output shard {tuple(self.split.shard_shape)} as "
                    f"last_hidden_state, got shape {tuple(last.shape)}: the model reshapes it (GPT-J's "
                    "does); parallelize it without sequence_parallel"
                )
            for key in ("last_hidden_state", "hidden_states"):
                if value.get(key) is not None:
                    value[key] = self._gather(value[key])
        return value

    def __call__(self, module: nn.Module, args: tuple, output):
        with stats.module_scope(stats.current_module() or self.name):
            return self._gather(output)


class _CheckHeadInput:
    """Forward pre-hook of a sequence-parallel head (lm_head): it must get the decoder's output shards as
    they are. A slice of them (Hugging Face's logits_to_keep, which generation uses) would be gathered
    into tokens of different ranks' positions; that is an error, not wrong logits."""

    def __init__(self, split: _SplitSequence, name: str):
        self.split, self.name = split, name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and self.split.shard_shape is not None and x.shape != self.split.shard_shape:
            raise ValueError(
                f"tpext.parallelize: under sequence parallelism {self.name} must get the decoder's "
                f"output shard {tuple(self.split.shard_shape)} whole, got {tuple(x.shape)} (a slice, "
                "as logits_to_keep or generation takes, or a reshape of it, as GPT-J's model does); "
                "generate with, or parallelize such a model, without sequence_parallel"
            )


def add_sequence_hooks(
    model: nn.Module,
    split_at: str,
    attention: list[str],
    converted: dict[str, nn.Module],
    group,
    sequence_dim: int,
    full_sequence_blocks: list[str],
    on_shards: list[str],
    replicated_blocks: list[str] | tuple[str, ...] = (),
) -> None:
    """The hooks of sequence parallelism: split at `split_at`, gather around attention and full-sequence
    blocks, check the head's input, and check that each module of `on_shards` (converted for sequence
    shards: a norm whose gradients are summed over the group, a sequence-parallel head) runs after the
    split. `replicated_blocks` (replicated whole, their output the dense block's on every rank) run on the
    full sequence with a plain split of their output."""
    split = _SplitSequence(group, sequence_dim, split_at)
    model.get_submodule(split_at).register_forward_pre_hook(split, with_kwargs=True)
    # The decoder stack (model.layers) and its owner (model): a sequence-parallel column layer outside the
    # stack (lm_head) gathers the shards itself, overlapped with its GEMM; without one, the owner's output
    # is gathered.
    stack = split_at.rpartition(".")[0]
    owner = stack.rpartition(".")[0]
    model.get_submodule(owner).register_forward_pre_hook(_StartForward(split))
    for name in on_shards:
        if not name.startswith(stack + "."):  # inside the stack everything runs after the split
            converted[name].register_forward_pre_hook(_CheckRunsOnShards(split, name))
    heads = [
        name
        for name, m in converted.items()
        if isinstance(m, ColumnParallelLinear) and m.sequence_parallel and not name.startswith(stack + ".")
    ]
    if not heads:
        model.get_submodule(owner).register_forward_hook(
            _GatherStackOutput(split, f"{owner or 'model'}.gather")
        )
    for name in heads:
        converted[name].register_forward_pre_hook(_CheckHeadInput(split, name))
    for name in attention:
        if any(name.startswith(block + ".") for block in [*full_sequence_blocks, *replicated_blocks]):
            continue  # inside a block that runs on the full sequence (Gemma4's experts beside attention)
        columns = [
            converted[p]
            for leaf in ATTENTION_INPUTS
            if (p := f"{name}.{leaf}" if name else leaf) in converted
        ]
        columns = [m for m in columns if isinstance(m, ColumnParallelLinear)]
        if not columns:
            continue
        shared = columns[0]._siblings
        if len(columns) == 1 and shared is None:  # a packed qkv_proj: its own gather + GEMM
            shared = SharedInputColumns(columns).attach()
        elif shared is not None and shared.layers != columns:
            shared = None
        hook = _GatherSequence(columns, shared, f"{name}.gather" if name else "gather")
        model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    for name in full_sequence_blocks:
        block, hook = model.get_submodule(name), _FullSequenceBlock(group, sequence_dim, name)
        block.register_forward_pre_hook(hook.gather, with_kwargs=True)
        block.register_forward_hook(hook.split)
    for name in replicated_blocks:  # the same output on every rank: the plain split
        block, hook = model.get_submodule(name), _FullSequenceBlock(group, sequence_dim, name)
        block.register_forward_pre_hook(hook.gather, with_kwargs=True)
        block.register_forward_hook(_CheckReplicatedOutputs(name, sequence_dim), with_kwargs=True)
        block.register_forward_hook(hook.split)


class _CheckReplicatedOutputs:
    """Forward hook of a block replicated whole under SP, before its output is split: besides its hidden
    states it must return no tensor that carries a gradient and has no dim of the sequence's length. Such a
    tensor (GPT-NeoX-Japanese's attention returns its dense_bias, which its layer adds) is the same on every
    rank, but its caller may apply it to this rank's sequence shard, so its gradient would hold this rank's
    tokens only; that is an error, not a partial gradient. A tensor over the sequence (attention weights)
    would not fit a shard (a shape error, not a wrong number)."""

    def __init__(self, name: str, sequence_dim: int):
        self.name, self.sequence_dim = name, sequence_dim

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        extra = output[1:] if isinstance(output, (tuple, list)) else ()
        if not extra:
            return
        length = _hidden_states(module, args, kwargs)[0].shape[self.sequence_dim]
        for i, value in enumerate(extra, 1):
            if isinstance(value, Tensor) and value.requires_grad and length not in value.shape:
                raise ValueError(
                    f"tpext.parallelize: {self.name} ({type(module).__name__}) is replicated whole and, under "
                    f"sequence parallelism, run on the full sequence; besides its hidden states it returns a "
                    f"tensor that carries a gradient (output {i}, shape {tuple(value.shape)}), which its caller "
                    "may apply to this rank's sequence shard, so its gradient would be partial; parallelize "
                    "with sequence_parallel=False"
                )


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
