"""Sequence parallelism: the hooks tpext.parallelize attaches to a model's decoder stack.

* the first decoder layer splits the sequence (`_SplitSequence`): the embedding and the model-level
  code that derives positions and the causal mask from its output's shape see the full sequence, as
  in the dense model; the layers see this rank's shard;
* each sharded attention module gathers it back (`_GatherSequence`), overlapped with the q/k/v GEMM,
  so attention code that takes the sequence length from its input sees the dense shapes;
* blocks that run on the full sequence (mixture-of-experts blocks, replicated blocks) gather their input
  and split or reduce-scatter their output (tpext.parallel.full_sequence);
* the decoder stack's output is gathered back for a model with no sequence-parallel head, and a
  sequence-parallel head checks it gets the shards whole;
* modules replicated outside the layers must run before the split (tpext.parallel.replicated).
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Collection

import torch
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import SharesGroupOnCopy
from tpext.nn import ColumnParallelLinear, SharedInputColumns, sum_param_grads
from tpext.parallel import mamba, mla
from tpext.parallel import structure as st
from tpext.parallel.full_sequence import FullSequenceBlock, always_gathered, reduce_once
from tpext.parallel.replicated import check_replicated_outputs, runs_before_split
from tpext.parallel.structure import ATTENTION_INPUTS

__all__ = ["add_sequence_hooks"]


class _SplitSequence(SharesGroupOnCopy):
    """Forward pre-hook of the first decoder layer under SP: from here on activations are this rank's
    sequence shard (the dual of the split, an all-gather, runs in backward)."""

    def __init__(self, group, sequence_dim: int, name: str):
        self.group, self.sequence_dim, self.name = group, sequence_dim, name

    #: The shape of the last shard this hook made (what _GatherStackOutput recognises as a shard).
    shard_shape: torch.Size | None = None
    #: Whether the sequence has been split in the current forward of the stack's owner (_StartForward resets it).
    done: bool = False
    #: Whether the last decoder layer has run in the current forward (_EndStack).
    stack_done: bool = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, call_with = st.hidden_states_arg(module, args, kwargs)
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
        self.split.done = self.split.stack_done = False


class _EndStack:
    """Forward hook of the last decoder layer under SP: what runs after it in the stack's owner runs on
    the decoder stack's output shards."""

    def __init__(self, split: _SplitSequence):
        self.split = split

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        self.split.stack_done = True


_SHARD_AWARE: dict[type, Callable] = {}


def _shard_aware_forward(cls: type) -> Callable:
    """`_forward_on_shards` with the signature of cls.forward (what Hugging Face's generate inspects)."""
    if cls not in _SHARD_AWARE:

        @functools.wraps(cls.forward)
        def forward(self, *args, **kwargs):
            return _forward_on_shards(self, *args, **kwargs)

        _SHARD_AWARE[cls] = forward
    return _SHARD_AWARE[cls]


def _forward_on_shards(self: nn.Module, *args, **kwargs):
    """The forward of the decoder stack's owner under SP: a shape error its own code raises after the decoder
    layers (GPT-BigCode views the stack's output as the full sequence) is a tpext.parallelize error."""
    split = self.__dict__["_tpext_split"]
    try:
        return type(self).forward(self, *args, **kwargs)
    except RuntimeError as exc:
        text = str(exc)
        if not split.stack_done or not ("shape" in text or "size" in text):
            raise
        owner = split.name.rpartition(".")[0].rpartition(".")[0] or "the model"
        raise ValueError(
            f"tpext.parallelize: under sequence parallelism the code of {owner} ({type(self).__name__}) "
            "after its decoder layers expects the full sequence, not their output shard "
            f"{tuple(split.shard_shape or ())}; parallelize it with sequence_parallel=False "
            f"({text.splitlines()[0] if text else type(exc).__name__})"
        ) from exc


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


class _EndForward:
    """Forward hook of the model parallelize was given: its forward is over, so a module called on its own
    afterwards (a vision tower) is not after the split."""

    def __init__(self, split: _SplitSequence):
        self.split = split

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        self.split.done = self.split.stack_done = False


class _GatherSequence(SharesGroupOnCopy):
    """Forward pre-hook of an attention module under SP: the module is called with the full sequence, so
    attention code that takes the sequence length from its input (Hugging Face's does) sees the dense
    shapes; o_proj reduce-scatters its output back to a shard. With q/k/v in one SharedInputColumns (or
    one packed qkv_proj) the gather is overlapped with their one GEMM (SharedInputColumns.gather);
    otherwise a plain all-gather, and each projection multiplies the gathered sequence locally.

    The column layers send partial gradients into the gathered sequence, which its backward sums
    (reduce-scatter); a column layer called with another input (an MLA up projection reading a latent)
    treats it as replicated. `readers`, modules with replicated weights that read the gathered sequence
    (an MLA attention's down projections), compute the same on every rank: their gradient is whole, and
    they get the gathered values through `_ReplicatedRead`, whose backward keeps this rank's block of it
    (counted once, not once per rank)."""

    def __init__(
        self,
        columns: list[ColumnParallelLinear],
        shared: SharedInputColumns | None,
        name: str,
        group,
        sequence_dim: int,
        readers: list[nn.Module] = (),
    ):
        self.shared, self.name = shared, name
        self.group, self.sequence_dim = group, sequence_dim
        self._gathered: weakref.ref | None = None
        self._shard: weakref.ref | None = None
        for layer in columns:
            layer._is_gathered_input = self.is_gathered
        for module in readers:
            module.register_forward_pre_hook(self.replicated_read, with_kwargs=True)

    def is_gathered(self, x: Tensor) -> bool:
        """Whether x is the sequence this hook gathered last (a projection called with another tensor, such
        as cross-attention's memory, treats it as a replicated input of its own)."""
        return self._gathered is not None and self._gathered() is x

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, call_with = st.hidden_states_arg(module, args, kwargs)
        if self.shared is not None:
            x_full = self.shared.gather(x)
        else:
            with stats.module_scope(stats.current_module() or self.name):
                x_full = mappings.gather_from_sequence(x, self.group, dim=self.sequence_dim)
        self._gathered, self._shard = weakref.ref(x_full), weakref.ref(x)
        return call_with(x_full)

    def replicated_read(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Forward pre-hook of a reader with replicated weights: the gathered sequence, as `_ReplicatedRead`."""
        x, call_with = st.hidden_states_arg(module, args, kwargs)
        shard = self._shard() if self._shard is not None else None
        if not self.is_gathered(x) or shard is None or not torch.is_grad_enabled():
            return None
        return call_with(_ReplicatedRead.apply(shard, x.detach(), self.group, self.sequence_dim))


class _MixerGather(_GatherSequence):
    """Forward pre-hook of a sharded Mamba mixer under SP: the sequence gathered overlapped with in_proj's GEMM
    where the mixer hands its input to in_proj as it is, and a plain all-gather where it scales it first
    (`scales`: Falcon-H1's ssm_in_multiplier) or masks it (an attention_mask passed), which would leave that
    GEMM unused and compute it again on the new input."""

    def __init__(self, column: ColumnParallelLinear, name: str, group, sequence_dim: int, *, scales: bool):
        super().__init__([column], SharedInputColumns([column]).attach(), name, group, sequence_dim)
        self.overlapped, self.scales = self.shared, scales

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        self.shared = None if self.scales or kwargs.get("attention_mask") is not None else self.overlapped
        return super().__call__(module, args, kwargs)


class _ReplicatedRead(torch.autograd.Function):
    """x_full's values (the sequence gathered from x_shard), read by a module with replicated weights that
    every rank runs alike. Backward: its gradient is whole on every rank, and x_shard keeps its own block of
    it along `dim` (no collective).

        forward:  x_shard [.., s/R, ..], x_full [.., s, ..] -> x_full
        backward: grad [.., s, ..] -> grad's block r [.., s/R, ..] for x_shard
    """

    @staticmethod
    def forward(ctx, x_shard: Tensor, x_full: Tensor, group, dim: int) -> Tensor:
        ctx.dim, ctx.start, ctx.length = dim, group.rank() * x_shard.shape[dim], x_shard.shape[dim]
        return x_full.view_as(x_full)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.narrow(ctx.dim, ctx.start, ctx.length).contiguous(), None, None, None


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
    partial_blocks: Collection[str] = (),
    replicated_blocks: list[str] | tuple[str, ...] = (),
    before_split: list[str] | tuple[str, ...] = (),
    layer_params: list[str] | tuple[str, ...] = (),
    mixers: list[str] | tuple[str, ...] = (),
) -> None:
    """The hooks of sequence parallelism: split at `split_at`, gather around attention and full-sequence
    blocks, check the head's input, and check that each module of `on_shards` (converted for sequence
    shards: a norm whose gradients are summed over the group, a sequence-parallel head) runs after the
    split. The full-sequence blocks in `partial_blocks` (those `partial_sums_reason` accepts) reduce-scatter
    their partial outputs; the others split their replicated output. `replicated_blocks` (replicated whole,
    their output the dense block's on every rank) run on the full sequence with a plain split of their
    output. The modules of `before_split` (replicated outside the decoder layers) must run before the
    split in each forward of `model`. The decoder layers of `layer_params` (their own replicated scales)
    that run on sequence shards sum their own parameters' gradients over the group. The Mamba mixers of
    `mixers` (sharded by heads or channels, tpext.parallel.mamba) read the gathered sequence, as attention
    does."""
    split = _SplitSequence(group, sequence_dim, split_at)
    model.get_submodule(split_at).register_forward_pre_hook(split, with_kwargs=True)
    # The decoder stack (model.layers) and its owner (model): a sequence-parallel column layer outside the
    # stack (lm_head) gathers the shards itself, overlapped with its GEMM; without one, the owner's output
    # is gathered.
    stack = split_at.rpartition(".")[0]
    owner = stack.rpartition(".")[0]
    model.get_submodule(owner).register_forward_pre_hook(_StartForward(split))
    layers = list(model.get_submodule(stack).children()) if stack else []
    if layers:
        layers[-1].register_forward_hook(_EndStack(split))
        owner_module = model.get_submodule(owner)
        owner_module._tpext_split = split
        owner_module.forward = types.MethodType(_shard_aware_forward(type(owner_module)), owner_module)
    if before_split:
        if model is not model.get_submodule(owner):  # a tower runs in the model's forward, before the owner's
            model.register_forward_pre_hook(_StartForward(split))
        model.register_forward_hook(_EndForward(split))
    first = next((i for i, m in enumerate(layers) if m is model.get_submodule(split_at)), 0)
    for name in layer_params:
        index = next((i for i, m in enumerate(layers) if m is model.get_submodule(name)), None)
        if index is None:
            raise ValueError(
                f"tpext.parallelize: {name} has replicated parameters of its own and is not a layer of the "
                f"decoder stack {stack} the sequence is split in, so under sequence_parallel=True tpext cannot "
                "tell whether it sees shards; parallelize with sequence_parallel=False"
            )
        if index >= first:  # it runs on this rank's shard: each rank's gradient holds its tokens' share
            sum_param_grads(model.get_submodule(name), group)
    for name in before_split:
        runs_before_split(model, name, split)
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
        attn = model.get_submodule(name)
        latent = mla.is_mla(attn)
        if not columns and not latent:
            continue
        shared = columns[0]._siblings if columns else None
        if len(columns) == 1 and shared is None:  # a packed qkv_proj: its own gather + GEMM
            shared = SharedInputColumns(columns).attach()
        elif shared is not None and shared.layers != columns:
            shared = None
        # MLA: its up projections (and output gate) are column layers too, their input the latents or the
        # gathered sequence; its down projections read the gathered sequence with replicated weights.
        others = [m for m in attn.children() if isinstance(m, ColumnParallelLinear) and m not in columns]
        readers = [getattr(attn, leaf) for leaf in mla.REPLICATED_READERS if latent and hasattr(attn, leaf)]
        readers = [m for m in readers if isinstance(m, nn.Module) and not isinstance(m, ColumnParallelLinear)]
        hook = _GatherSequence(
            columns + others, shared, f"{name}.gather" if name else "gather", group, sequence_dim, readers
        )
        attn.register_forward_pre_hook(hook, with_kwargs=True)
    for name in mixers:  # its column layer reads the gathered sequence; its row layer reduce-scatters
        if any(name.startswith(block + ".") for block in [*full_sequence_blocks, *replicated_blocks]):
            continue
        mixer = model.get_submodule(name)
        column = getattr(mixer, mamba.COLUMN)
        hook = _MixerGather(column, f"{name}.gather", group, sequence_dim, scales=mamba.scales_input(mixer))
        mixer.register_forward_pre_hook(hook, with_kwargs=True)
        column._is_gathered_input = always_gathered  # also once scaled or masked by the mixer
    for name in full_sequence_blocks:
        partial = name in partial_blocks
        if partial:
            reduce_once(name, model, converted, group)
        block = model.get_submodule(name)
        hook = FullSequenceBlock(group, sequence_dim, name, partial_output=partial)
        block.register_forward_pre_hook(hook.gather, with_kwargs=True)
        block.register_forward_hook(hook.split)
    for name in replicated_blocks:  # the same output on every rank: the plain split
        block, hook = model.get_submodule(name), FullSequenceBlock(group, sequence_dim, name)
        block.register_forward_pre_hook(hook.gather, with_kwargs=True)
        check_replicated_outputs(block, name, sequence_dim)
        block.register_forward_hook(hook.split)
