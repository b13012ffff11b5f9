"""What tpext.parallelize attaches to a model besides its converted modules.

Under sequence parallelism, two forward pre-hooks:
  * the first decoder layer splits the sequence (`_SplitSequence`): the embedding and the model-level
    code that derives positions and the causal mask from its output's shape see the full sequence, as
    in the dense model; the layers see this rank's shard;
  * each sharded attention module gathers it back (`_GatherSequence`), overlapped with the q/k/v GEMM,
    so attention code that takes the sequence length from its input sees the dense shapes;
  * each mixture-of-experts block runs on the full sequence (`_FullSequenceBlock`) and returns this
    rank's shard: where its output is a sum of its experts' (and shared expert's) partial outputs, each
    rank computes its partial sum and the block's output is reduce-scattered once; otherwise those
    reduce their own outputs and the block's replicated output is split.
And for models that compute their own loss from labels (Hugging Face's `loss_function`), a causal-LM
loss on the vocabulary-sharded logits of a vocab-parallel lm_head; for models with Hugging Face's
`save_pretrained`, one that writes the dense model.
"""

from __future__ import annotations

import functools
import itertools
import types
import weakref
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import SharesGroupOnCopy
from tpext.nn import ColumnParallelLinear, RowParallelLinear, SharedInputColumns, sum_param_grads
from tpext.nn._linear_functions import autocast_inputs
from tpext.nn.class_swap import derived_class, probe_copy
from tpext.nn.experts import _is_transposed, _ShardedExperts
from tpext.nn.functional import vocab_parallel_cross_entropy
from tpext.parallel import mamba, mla
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
    #: Whether the last decoder layer has run in the current forward (_EndStack).
    stack_done: bool = False

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


class _ReplicatedCheck:
    """Forward pre-hook of a replicated module named `name`: raises a ValueError naming the module, its class
    and what `_misuse` returns (why replicating it is wrong where it runs now), when that is not None."""

    name: str

    def _misuse(self) -> str | None:
        raise NotImplementedError

    def __call__(self, module: nn.Module, args: tuple) -> None:
        misuse = self._misuse()
        if misuse is not None:
            raise ValueError(
                f"tpext.parallelize: {self.name} ({type(module).__name__}) is replicated {misuse}"
            )


class _CheckRunsBeforeSplit(_ReplicatedCheck):
    """Forward pre-hook of a module replicated outside the decoder layers under SP (a vision or audio tower,
    a per-layer embedding, a mixer beside the layers): it must run before the sequence is split, on the
    full sequence, where its replicated weights get the dense gradient. Called after the split it would see
    this rank's shard, and its gradients would hold this rank's tokens only; that is an error, not a
    partial gradient."""

    def __init__(self, split: _SplitSequence, name: str):
        self.split, self.name = split, name

    def _misuse(self) -> str | None:
        if not self.split.done:
            return None
        return (
            f"outside the decoder layers and runs after the sequence is split at {self.split.name}, so under "
            "sequence_parallel=True it sees this rank's sequence shard and its replicated weights would "
            "get partial gradients; parallelize with sequence_parallel=False, or plan it yourself"
        )


def _called(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of what the model calls for `module`: itself, or for a list or dict of modules (which
    has no forward) the modules it holds."""
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [(name, module)]
    return [pair for leaf, child in module.named_children() for pair in _called(f"{name}.{leaf}", child)]


class _InLayers:
    """How many decoder layers are running now: forward pre-hook and hook of each layer of the stack, reset
    at the start of each forward of the model (a layer that raised leaves no count behind)."""

    depth: int = 0

    def enter(self, module: nn.Module, args: tuple) -> None:
        self.depth += 1

    def leave(self, module: nn.Module, args: tuple, output) -> None:
        self.depth = max(self.depth - 1, 0)

    def reset(self, module: nn.Module, args: tuple) -> None:
        self.depth = 0


class _CheckOutsideLayers(_ReplicatedCheck):
    """Forward pre-hook of a module replicated outside the decoder layers: replicating it is right because
    it reads replicated activations, which holds outside the layers. Called inside a decoder layer (a module
    the model shares between its layers) it may read features sharded over the group; that is an error, not
    a wrong number."""

    def __init__(self, layers: _InLayers, name: str, stack: str):
        self.layers, self.name, self.stack = layers, name, stack

    def _misuse(self) -> str | None:
        if not self.layers.depth:
            return None
        return (
            f"as a module outside the decoder layers, but it runs inside one of them ({self.stack}), where it "
            "may read features sharded over the group; plan it yourself (plan={pattern: style}, starting "
            "from tpext.auto_plan)"
        )


def add_outside_layer_checks(model: nn.Module, stack: str, names: list[str]) -> None:
    """Check at forward that each module of `names` (replicated by auto_plan outside the decoder layers)
    runs outside the layers of the decoder stack `stack`."""
    if not names or not stack:
        return
    layers = _InLayers()
    model.register_forward_pre_hook(layers.reset)
    for layer in model.get_submodule(stack).children():
        layer.register_forward_pre_hook(layers.enter)
        layer.register_forward_hook(layers.leave)
    for name in names:
        for target, module in _called(name, model.get_submodule(name)):
            module.register_forward_pre_hook(_CheckOutsideLayers(layers, target, stack))


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
        x, call_with = _hidden_states(module, args, kwargs)
        if self.shared is not None:
            x_full = self.shared.gather(x)
        else:
            with stats.module_scope(stats.current_module() or self.name):
                x_full = mappings.gather_from_sequence(x, self.group, dim=self.sequence_dim)
        self._gathered, self._shard = weakref.ref(x_full), weakref.ref(x)
        return call_with(x_full)

    def replicated_read(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Forward pre-hook of a reader with replicated weights: the gathered sequence, as `_ReplicatedRead`."""
        x, call_with = _hidden_states(module, args, kwargs)
        shard = self._shard() if self._shard is not None else None
        if not self.is_gathered(x) or shard is None or not torch.is_grad_enabled():
            return None
        return call_with(_ReplicatedRead.apply(shard, x.detach(), self.group, self.sequence_dim))


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


class _FullSequenceBlock(SharesGroupOnCopy):
    """Forward pre-hook and hook of a block that runs on the full sequence under SP (a mixture-of-experts
    block: its experts hold a slice of every token's features, and its router must see every token). Its
    input is all-gathered; what it does with its output depends on `partial_output`:

      * False: the block's output is full and identical on every rank (its experts and shared expert
        all-reduce their own outputs, or the block is replicated); each rank keeps its shard of it. Every
        rank computes the same thing from the gathered input, so the gather's backward keeps this rank's
        block of the gradient, and the split's backward all-gathers.
      * True: each rank's output is its partial sum (experts and row layers unreduced, see
        `partial_sums_reason`), reduce-scattered to this rank's shard: an all-gather and a reduce-scatter
        in forward, their duals in backward. Every gradient inside the block is then a partial sum too:
        the gather's backward reduce-scatters it, and the block's replicated parameters (its router, a
        shared-expert gate) sum theirs over the group. Tensors it returns besides its hidden states (router
        logits) pass their gradient into the block on rank 0 only.
    """

    def __init__(self, group, sequence_dim: int, name: str, *, partial_output: bool = False):
        self.group, self.sequence_dim, self.name = group, sequence_dim, name
        self.partial_output = partial_output
        self._shape = None

    def gather(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        x, call_with = _hidden_states(module, args, kwargs)
        with stats.module_scope(stats.current_module() or f"{self.name}.gather"):
            x_full = mappings.gather_from_sequence(
                x, self.group, self.sequence_dim, replicated_grad=not self.partial_output
            )
        self._shape = x_full.shape
        return call_with(x_full.contiguous())  # the block's code may view() it

    def _scatter(self, out: Tensor) -> Tensor:
        # A block that returns its tokens flattened (Llama 4's [b * s, h]) gets them back in its input's
        # shape first, so the split cuts the sequence and not the features.
        if self._shape is not None and out.shape != self._shape and out.numel() == self._shape.numel():
            out = out.reshape(self._shape)
        if self.partial_output:
            return mappings.reduce_scatter_to_sequence(out, self.group, self.sequence_dim)
        return mappings.scatter_to_sequence(out, self.group, self.sequence_dim)

    def _other_output(self, value):
        if self.partial_output and isinstance(value, Tensor) and value.is_floating_point():
            return _GradOnFirstRank.apply(value, self.group.rank() == 0)
        return value

    def split(self, module: nn.Module, args: tuple, output):
        scope = f"{self.name}.{'reduce_scatter' if self.partial_output else 'split'}"
        with stats.module_scope(stats.current_module() or scope):
            if isinstance(output, Tensor):
                return self._scatter(output)
            if (
                isinstance(output, tuple) and output and isinstance(output[0], Tensor)
            ):  # (hidden states, router logits)
                return (self._scatter(output[0]), *(self._other_output(v) for v in output[1:]))
        raise TypeError(
            f"tpext.parallelize: under sequence parallelism the mixture-of-experts block {self.name} must "
            f"return its hidden states (or a tuple starting with them), got {type(output).__name__}"
        )


class _GradOnFirstRank(torch.autograd.Function):
    """Identity; backward passes the gradient on rank 0 and zeros elsewhere: a replicated tensor's gradient
    entering a region where every rank's gradients are partial sums, counted once."""

    @staticmethod
    def forward(ctx, x: Tensor, first: bool) -> Tensor:
        ctx.first = first
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad if ctx.first else torch.zeros_like(grad)), None


class _OutsideGradOnce:
    """Forward hooks of a replicated module inside a block with partial outputs (its router): code outside
    the block may keep its output (Hugging Face's output recorders keep the router logits for the
    load-balancing loss) and send a gradient into it that is whole on every rank, where the gradients
    inside the block are partial sums. Hooks registered between `wrap` (run first) and `unwrap` (kept
    last) see the output with that gradient passed on rank 0 only; the block gets the output itself."""

    def __init__(self, first: bool):
        self.first, self.handle_id = first, None
        self._raw: list = []

    def wrap(self, module: nn.Module, args: tuple, output):
        self._raw.append(output)
        if isinstance(output, Tensor):
            return _GradOnFirstRank.apply(output, self.first) if output.is_floating_point() else output
        if isinstance(output, tuple) and not hasattr(output, "_fields"):
            return tuple(self.wrap_one(v) for v in output)
        return output

    def wrap_one(self, value):
        if isinstance(value, Tensor) and value.is_floating_point():
            return _GradOnFirstRank.apply(value, self.first)
        return value

    def keep_last(self, module: nn.Module, args: tuple) -> None:
        if self.handle_id in module._forward_hooks:
            module._forward_hooks.move_to_end(self.handle_id)

    def unwrap(self, module: nn.Module, args: tuple, output):
        return self._raw.pop() if self._raw else output

    def attach(self, module: nn.Module) -> None:
        module.register_forward_hook(self.wrap, prepend=True)
        self.handle_id = module.register_forward_hook(self.unwrap).id
        module.register_forward_pre_hook(self.keep_last)


class _PartialRowOutput:
    """Mixin of a RowParallelLinear inside a block that reduces its output once (`_FullSequenceBlock` with
    partial_output=True): this rank's partial product, unreduced; the bias is added on rank 0 and its
    gradient summed over the group."""

    def forward(self, x: Tensor) -> Tensor:
        with stats.scope_for(self):
            self._check_features(
                x, self.local_weight_shape[1], f"this rank's shard of in_features={self.in_features}"
            )
            w, b = self._params()
            x, w, b = autocast_inputs(x, w, b)
            if b is not None:
                b = mappings.copy_to_tp(b, self.group)
                if self.tp_rank != 0:
                    b = b * 0  # every rank runs the same graph, and the same collectives in backward
            return F.linear(x, w, b)


def _whole_input(x: Tensor) -> bool:
    """A column layer inside a block that reduces its output once: every input is replicated (computed from
    the gathered sequence), its gradient a partial sum that the block's gather reduce-scatters."""
    return True


def _inside(name: str, block: str) -> bool:
    return name.startswith(block + ".") if block else True


# Relative error that a sum of partial outputs may show against the dense output, by dtype (fp64 models'
# blocks may combine their outputs in fp32: Hunyuan's enable_moe_fp32_combine).
_SUM_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
# A block on the meta device is probed on a CPU fp32 copy with random weights: at most this many (256 MiB).
_META_PROBE_LIMIT = 1 << 26


def partial_sums_reason(model: nn.Module, block_name: str, converted: dict[str, nn.Module]) -> str:
    """Why the (still dense) block `block_name` cannot run with partial outputs reduced once at its output.

    Every module of it that `converted` replaces must be a column layer, a row layer on its column layers'
    output or a sharded experts module, and the block's output must be a sum of its row layers' and experts
    modules' outputs, times factors that do not depend on them (a shared-expert gate): checked on the block's
    own forward, those outputs replaced by random a and by o - a, whose results must add up to the block's
    output with o (on a CPU copy with random weights for a model on meta, of at most `_META_PROBE_LIMIT`
    weights: a larger block on meta is not probed and keeps the all-reduce).

    Args:
        model: the dense model, its modules not replaced yet.
        block_name: the block's name in `model`.
        converted: {name: replacement} of the modules parallelize converts.

    Returns:
        "" where it can, else the reason (the block then keeps its layers' own all-reduce).

    Example:
        >>> partial_sums_reason(model, "model.layers.0.mlp", converted)
        ''
    """
    producers = []
    for name, new in converted.items():
        if not _inside(name, block_name):
            continue
        if isinstance(new, ColumnParallelLinear) and not new.gather_output:
            continue
        if isinstance(new, RowParallelLinear) and new.input_is_parallel:
            producers.append(name[len(block_name) + 1 :] if block_name else name)
        elif isinstance(new, _ShardedExperts):
            producers.append(name[len(block_name) + 1 :] if block_name else name)
        else:
            return (
                f"it holds {name}, a {type(new).__name__} (only column, row and experts layers reduce once)"
            )
    if not producers:
        return "no layer in it has a partial output"
    block = model.get_submodule(block_name)
    tensors = list(itertools.chain(block.parameters(), block.buffers()))
    probe = block
    if any(t.is_meta for t in tensors):
        size = sum(t.numel() for t in tensors)
        if size > _META_PROBE_LIMIT:
            return (
                f"it is on the meta device with {size} weights, more than tpext copies to the CPU to probe "
                f"its forward ({_META_PROBE_LIMIT}); parallelize the model with its weights to have it probed"
            )
        probe = probe_copy(block)
    try:
        return _output_not_a_sum(probe, producers)
    except Exception as exc:  # noqa: BLE001 - a block that cannot run on a plain input: not probed
        return f"its forward could not be probed ({type(exc).__name__}: {exc})"


def _output_not_a_sum(block: nn.Module, producers: list[str]) -> str:
    modules = [block.get_submodule(p) for p in producers]
    param = next(iter(block.parameters()))
    first = modules[0]
    if isinstance(first, nn.Linear):
        hidden = first.out_features
    else:
        hidden = first.down_proj.shape[2 if _is_transposed(first) else 1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, hidden, generator=gen).to(param.device, param.dtype)
    recorded: list[list[Tensor]] = [[] for _ in modules]
    randoms: list[list[Tensor]] = [[] for _ in modules]
    state = {"mode": "record", "calls": [0] * len(modules)}

    def hook_for(i: int):
        def hook(module: nn.Module, args: tuple, out):
            if not isinstance(out, Tensor):
                raise TypeError(f"{producers[i]} returned a {type(out).__name__}, not a tensor")
            mode, call = state["mode"], state["calls"][i]
            state["calls"][i] += 1
            if mode == "record":
                recorded[i].append(out.detach().clone())
                a = torch.randn(out.shape, generator=gen, dtype=torch.float64) * out.double().std().clamp(
                    min=1
                )
                randoms[i].append(a.to(out.device, out.dtype))
                return None
            a = randoms[i][call]
            return a.clone() if mode == "a" else recorded[i][call] - a

        return hook

    def run(mode: str) -> Tensor:
        state["mode"], state["calls"] = mode, [0] * len(modules)
        devices = [param.device] if param.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)  # the same draws (router jitter, dropout) in every run
            out = block(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.detach().double()

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            whole, part, rest = run("record"), run("a"), run("rest")
    finally:
        for h in handles:
            h.remove()
    err = (part + rest - whole).abs().max().item()
    scale = max(whole.abs().max().item(), part.abs().max().item(), rest.abs().max().item(), 1e-30)
    if not err <= _SUM_TOLERANCE.get(param.dtype, 3e-2) * scale:
        return (
            f"its output is not a sum of the outputs of {', '.join(producers)} (something nonlinear "
            f"follows them: relative error {err / scale:.2g})"
        )
    return ""


def _reduce_once(block_name: str, model: nn.Module, converted: dict[str, nn.Module], group) -> None:
    """Convert the block `block_name` to partial outputs: its experts and row layers unreduced, its column
    layers' input gradients partial, the gradients of its replicated parameters summed over the group."""
    for name, new in converted.items():
        if not _inside(name, block_name):
            continue
        if isinstance(new, ColumnParallelLinear):
            # The input is the gathered sequence (or computed from it): the gradient, a partial sum, is
            # reduce-scattered by the block's gather.
            new.sequence_parallel, new._is_gathered_input = True, _whole_input
        elif isinstance(new, RowParallelLinear):
            new.__class__ = derived_class(type(new), _PartialRowOutput, wraps=True)
        elif isinstance(new, _ShardedExperts):
            new._tpext_partial_output = True
    block = model.get_submodule(block_name)
    prefix = f"{block_name}." if block_name else ""
    ids = {id(m) for m in converted.values()}
    tp = [prefix + n for n, m in block.named_modules() if id(m) in ids]
    for name, module in block.named_modules():
        full = prefix + name if name else block_name
        if any(full == c or full.startswith(c + ".") for c in tp):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            sum_param_grads(module, group)
            if module is not block:
                _OutsideGradOnce(group.rank() == 0).attach(module)


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
    that run on sequence shards sum their own parameters' gradients over the group. The Mamba-2 mixers of
    `mixers` (sharded by heads, tpext.parallel.mamba) read the gathered sequence, as attention does."""
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
        for target, module in _called(name, model.get_submodule(name)):
            module.register_forward_pre_hook(_CheckRunsBeforeSplit(split, target))
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
        column = getattr(model.get_submodule(name), mamba.COLUMN)
        hook = _GatherSequence(
            [column], SharedInputColumns([column]).attach(), f"{name}.gather", group, sequence_dim
        )
        model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
        column._is_gathered_input = mamba.reads_gathered_sequence  # also once scaled or masked by the mixer
    for name in full_sequence_blocks:
        partial = name in partial_blocks
        if partial:
            _reduce_once(name, model, converted, group)
        block = model.get_submodule(name)
        hook = _FullSequenceBlock(group, sequence_dim, name, partial_output=partial)
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
    tokens only; that is an error, not a partial gradient. Hidden states over the full sequence (its length
    and the input's features) besides the first output are an error too: only the first output is split, so
    its caller would meet them beside sequence shards (HY-V4's hyper-connections return (mixing weights,
    hidden states))."""

    def __init__(self, name: str, sequence_dim: int):
        self.name, self.sequence_dim = name, sequence_dim

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        extra = output[1:] if isinstance(output, (tuple, list)) else ()
        if not extra:
            return
        hidden = _hidden_states(module, args, kwargs)[0]
        length = hidden.shape[self.sequence_dim]
        for i, value in enumerate(extra, 1):
            if (  # hidden states over the full sequence (not attention weights: their last dim is keys)
                isinstance(value, Tensor)
                and value.dim() > self.sequence_dim
                and value.shape[self.sequence_dim] == length
                and value.shape[-1] == hidden.shape[-1]
            ):
                raise ValueError(
                    f"tpext.parallelize: {self.name} ({type(module).__name__}) is replicated whole and, under "
                    "sequence parallelism, run on the full sequence; besides its first output, which tpext "
                    f"splits back to this rank's shard, it returns a tensor over the full sequence (output "
                    f"{i}, shape {tuple(value.shape)}), which its caller would meet beside sequence shards; "
                    "parallelize with sequence_parallel=False"
                )
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
