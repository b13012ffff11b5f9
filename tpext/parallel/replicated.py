"""Replicated modules: which ones auto_plan replicates whole, and the checks that they run where that is right.

At plan time (`replicated_blocks`, `replicated_outside`): a decoder layer's block that holds what tpext
cannot shard (a Mamba mixer, a linear-attention or recurrent block), a module outside the decoder layers
(a vision or audio tower, a projector, a per-layer embedding) and a decoder layer's own scales are
replicated, each with the reason why; a block that would read or feed a sibling's sharded features is
refused instead.

At forward (hooks parallelize attaches): a module replicated outside the decoder layers reads replicated
activations only while it runs outside them; under sequence parallelism it must also run before the
sequence is split. A block replicated whole under SP returns its output to be split back to this rank's
shard, and nothing besides it that its caller would meet beside sequence shards. Each check raises a
ValueError naming the module, not a wrong gradient.
"""

from __future__ import annotations

from torch import Tensor, nn

from tpext.parallel import structure as st
from tpext.parallel.styles import Colwise, Rowwise, Style

__all__ = [
    "replicated_blocks",
    "replicated_outside",
    "OWN_PARAMETERS",
    "LAYER_PARAMETERS",
    "add_outside_layer_checks",
    "runs_before_split",
    "check_replicated_outputs",
]


def replicated_blocks(
    unplaced: list[tuple[str, str]], modules: dict[str, nn.Module], entries: dict[str, Style]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({block: why it is replicated}, what stays unplaced) for the unplaced (name, why) pairs.

    A block runs between two points of the residual stream, which is replicated (without SP; under SP the
    block is gathered to the full sequence): run whole on every rank, it computes the dense block's output
    and, from the replicated output gradient, the dense gradients of its input and its weights. That
    holds when nothing sharded flows into or out of it past the layer's sharded children (attention, MLPs,
    which return full features): a layer with a column- or row-parallel layer of its own (an MLP written
    in the layer) passes sharded features between its children, and so does a block that holds the other
    half of a sibling's column or row layers (BERT's output, whose row layer reads intermediate's columns):
    such blocks are refused."""
    by_block: dict[str, list[tuple[str, str]]] = {}
    rest = []
    for name, why in unplaced:
        block = st.layer_block(name, modules)
        (by_block.setdefault(block, []) if block else rest).append((name, why))
    blocks = {}
    for block, inside in by_block.items():
        layer = block.rpartition(".")[0]
        sharded = [
            n
            for n, style in entries.items()
            if n.rpartition(".")[0] == layer and n != block and isinstance(style, (Colwise, Rowwise))
        ]
        # A sibling whose column layers' row layers (or the reverse) are in the block (BERT's intermediate,
        # whose row layer is output.dense): replicated, the block would read or feed its sharded features.
        halves = _halves_outside(block, layer, modules, entries, set(by_block))
        if sharded or halves:
            cause = (
                f"layer {layer} has its own sharded layer {sharded[0]} ({entries[sharded[0]].kind})"
                if sharded
                else f"{halves} has {entries[halves].kind} layers whose other half is in the block"
            )
            rest += [
                (
                    name,
                    f"{why}; its block {block} cannot be replicated: {cause}, whose sharded features "
                    "the block may read or feed",
                )
                for name, why in inside
            ]
            continue
        names = ", ".join(
            f"{'its own weights' if name == block else name.removeprefix(block + '.')} ({why})"
            for name, why in inside[:3]
        )
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        blocks[block] = f"holds what tpext cannot shard: {names}{more}"
    return blocks, rest


def _halves_outside(
    block: str, layer: str, modules: dict[str, nn.Module], entries: dict[str, Style], blocks: set[str]
) -> str:
    """A column- or row-parallel layer in `layer` outside `block` whose other half is not outside it too
    (so it is in the block), or "". Each child of the layer beside the block holds column and row layers
    (attention, an MLP), or none, or one kind only (BERT's intermediate, output): those must pair up among
    themselves. Children in `blocks` are replicated too (their layers are not sharded)."""
    prefix = f"{layer}." if layer else ""
    one_kind: dict[type, str] = {}
    for child in (n for n in modules if n.startswith(prefix) and "." not in n[len(prefix) :]):
        if child == block or child in blocks:
            continue
        inside = [
            n
            for n, style in entries.items()
            if (n == child or n.startswith(child + ".")) and type(style) in (Colwise, Rowwise)
        ]
        kinds = {type(entries[n]) for n in inside}
        if len(kinds) == 1:
            one_kind.setdefault(kinds.pop(), inside[0])
    return next(iter(one_kind.values())) if len(one_kind) == 1 else ""


#: The start of the reason of a replicated entry that holds only the module's own parameters (its children


OWN_PARAMETERS = "its own parameters"
#: The start of the reason of a decoder layer's own replicated parameters (summed over the group under SP).
LAYER_PARAMETERS = f"{OWN_PARAMETERS} (a decoder layer"


def replicated_outside(
    unplaced: list[tuple[str, str]],
    model: nn.Module,
    modules: dict[str, nn.Module],
    *,
    sequence_parallel: bool,
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({module: why it is replicated}, what stays unplaced) for the unplaced (name, why) pairs outside the
    decoder stack's layers' blocks.

    Without SP everything outside the decoder stack's blocks reads replicated activations (token ids, the
    embeddings, the residual stream between layers, a vision or audio tower's inputs), so run as it is on
    every rank it computes the dense output and, from the replicated output gradient, the dense gradients.
    Replicated are:
      - a module outside the stack (a tower, a projector, a per-layer embedding, a mixer beside the layers):
        the largest module that holds it and not the stack, whole (nothing under it planned). Under SP it
        must run before the sequence is split (on the full sequence), which a forward check enforces;
      - the own parameters of a decoder layer (residual scales, at most 1-D; its children planned as they
        are): applied to each token, so under SP, where the layer runs on this rank's shard, parallelize
        sums their gradients over the group;
      - the own parameters of a module that holds the stack, without SP (under SP they may meet sequence
        shards, where their gradients would be partial: refused).
    Without a decoder stack beside the word embedding nothing is replicated."""
    stack = st.decoder_stack(model, modules)
    if not stack:
        return {}, unplaced
    found: dict[str, list[tuple[str, str]]] = {}
    own: dict[str, list[tuple[str, str]]] = {}
    rest = []
    for name, why in unplaced:
        parent, _, leaf = name.rpartition(".")
        if parent == stack and leaf.isdigit():  # a decoder layer itself: its own parameters
            params = list(modules[name].parameters(recurse=False))
            if all(p.dim() <= 1 for p in params):
                own.setdefault(name, []).append((name, why))
            else:
                rest.append((name, f"{why}; a decoder layer with a weight of its own (not a 1-D scale)"))
            continue
        if name.startswith(stack + "."):
            rest.append((name, why))  # inside a layer: its block (replicated_blocks)
            continue
        if stack.startswith(name + ".") or not name:
            own.setdefault(name, []).append((name, why))  # holds the stack: its own parameters
            continue
        parts = name.split(".")
        region = next(
            ".".join(parts[:i])
            for i in range(1, len(parts) + 1)
            if not stack.startswith(".".join(parts[:i]) + ".")
        )
        found.setdefault(region, []).append((name, why))
    regions = {}
    for region, inside in found.items():
        names = ", ".join(
            f"{'itself' if n == region else n.removeprefix(region + '.')} ({why})" for n, why in inside[:3]
        )
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        regions[region] = (
            f"outside the decoder layers ({stack}), reads replicated activations; holds what tpext cannot "
            f"shard: {names}{more}"
        )
    for name, inside in own.items():
        if name.rpartition(".")[0] == stack:  # a decoder layer's own scales, applied to its tokens
            regions[name] = (
                f"{LAYER_PARAMETERS}; {inside[0][1]}), applied to each token of the residual stream (under "
                "sequence parallelism their gradients are summed over the group)"
            )
        elif sequence_parallel:
            rest += [
                (
                    n,
                    f"{why}; its own parameters would be replicated, but under sequence parallelism they may "
                    "meet this rank's sequence shard, where their gradients would be partial: parallelize "
                    "without sequence_parallel",
                )
                for n, why in inside
            ]
        else:
            regions[name] = (
                f"{OWN_PARAMETERS} (it holds the decoder layers ({stack}); {inside[0][1]}), applied to "
                "replicated activations"
            )
    return regions, rest


class _ReplicatedCheck:
    """Forward pre-hook of a replicated module named `name`: raises a ValueError naming the module, its class
    and `why` (why replicating it is wrong where it runs now) when `state`'s attribute `flag` is true, that
    is, when the module runs where it must not. `state` is an object the model's other hooks keep up to
    date (so a deep copy of the model copies it with them)."""

    def __init__(self, name: str, state: object, flag: str, why: str):
        self.name, self.state, self.flag, self.why = name, state, flag, why

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if getattr(self.state, self.flag):
            raise ValueError(
                f"tpext.parallelize: {self.name} ({type(module).__name__}) is replicated {self.why}"
            )


def _called(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of what the model calls for `module`: itself, or for a list or dict of modules (which
    has no forward) the modules it holds."""
    if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [(name, module)]
    return [pair for leaf, child in module.named_children() for pair in _called(f"{name}.{leaf}", child)]


def runs_before_split(model: nn.Module, name: str, split) -> None:
    """Check at forward that the module `name`, replicated outside the decoder layers under SP (a vision or
    audio tower, a per-layer embedding, a mixer beside the layers), runs before the sequence is split at
    `split` (tpext.parallel.sequence's hook, whose `done` says whether it has split the sequence in this
    forward): on the full sequence, where its replicated weights get the dense gradient. Called after the
    split it would see this rank's shard, and its gradients would hold this rank's tokens only."""
    why = (
        f"outside the decoder layers and runs after the sequence is split at {split.name}, so under "
        "sequence_parallel=True it sees this rank's sequence shard and its replicated weights would "
        "get partial gradients; parallelize with sequence_parallel=False, or plan it yourself"
    )
    for target, module in _called(name, model.get_submodule(name)):
        module.register_forward_pre_hook(_ReplicatedCheck(target, split, "done", why))


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


def add_outside_layer_checks(model: nn.Module, stack: str, names: list[str]) -> None:
    """Check at forward that each module of `names` (replicated by auto_plan outside the decoder layers)
    runs outside the layers of the decoder stack `stack`: replicating it is right because it reads
    replicated activations, which holds outside the layers. Called inside a decoder layer (a module the
    model shares between its layers) it may read features sharded over the group."""
    if not names or not stack:
        return
    layers = _InLayers()
    model.register_forward_pre_hook(layers.reset)
    for layer in model.get_submodule(stack).children():
        layer.register_forward_pre_hook(layers.enter)
        layer.register_forward_hook(layers.leave)
    why = (
        f"as a module outside the decoder layers, but it runs inside one of them ({stack}), where it may read "
        "features sharded over the group; plan it yourself (plan={pattern: style}, starting from "
        "tpext.auto_plan)"
    )
    for name in names:
        for target, module in _called(name, model.get_submodule(name)):
            module.register_forward_pre_hook(_ReplicatedCheck(target, layers, "depth", why))


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
        hidden = st.hidden_states_arg(module, args, kwargs)[0]
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


def check_replicated_outputs(block: nn.Module, name: str, sequence_dim: int) -> None:
    """Check at forward that the block `name`, replicated whole under SP, returns nothing besides its hidden
    states that its caller would meet beside sequence shards (`_CheckReplicatedOutputs`)."""
    block.register_forward_hook(_CheckReplicatedOutputs(name, sequence_dim), with_kwargs=True)
