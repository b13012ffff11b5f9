"""Blocks that run on the full sequence under sequence parallelism, and the partial sums of MoE blocks.

A mixture-of-experts block's experts hold a slice of every token's features and its router must see every
token, so under SP the block reads the gathered sequence; a block replicated whole does too. Where the
block's output is a sum of its experts' (and row layers') partial outputs, each rank computes its partial
sum and the block's output is reduce-scattered once (`partial_sums_reason` checks the block's own forward
for it; `reduce_once` converts it); otherwise its layers reduce their own outputs and the block's replicated
output is split.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import SharesGroupOnCopy
from tpext.nn import ColumnParallelLinear, RowParallelLinear, sum_param_grads
from tpext.nn._linear_functions import autocast_inputs
from tpext.nn.class_swap import derived_class, probe_copy
from tpext.nn.experts import _is_transposed, _ShardedExperts
from tpext.parallel import structure as st

__all__ = ["FullSequenceBlock", "partial_sums_reason", "reduce_once", "always_gathered"]


class FullSequenceBlock(SharesGroupOnCopy):
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
        x, call_with = st.hidden_states_arg(module, args, kwargs)
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
    """Mixin of a RowParallelLinear inside a block that reduces its output once (`FullSequenceBlock` with
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


def always_gathered(x: Tensor) -> bool:
    """`_is_gathered_input` of a column layer whose every input is computed from a gathered sequence (inside a
    block that reduces its output once; a Mamba mixer's in_proj, whose input the mixer may scale or mask):
    its input gradient is a partial sum that the gather's backward reduce-scatters, never reduced by the
    layer itself.

    Example:
        >>> column._is_gathered_input = always_gathered
    """
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


def reduce_once(block_name: str, model: nn.Module, converted: dict[str, nn.Module], group) -> None:
    """Convert the block `block_name` to partial outputs: its experts and row layers unreduced, its column
    layers' input gradients partial, the gradients of its replicated parameters summed over the group."""
    for name, new in converted.items():
        if not _inside(name, block_name):
            continue
        if isinstance(new, ColumnParallelLinear):
            # The input is the gathered sequence (or computed from it): the gradient, a partial sum, is
            # reduce-scattered by the block's gather.
            new.sequence_parallel, new._is_gathered_input = True, always_gathered
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
