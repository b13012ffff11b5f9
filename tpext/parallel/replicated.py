"""Checks that a module replicated by auto_plan runs where replicating it is right.

A module replicated outside the decoder layers reads replicated activations only while it runs outside
them; under sequence parallelism it must also run before the sequence is split. A block replicated whole
under SP returns its output to be split back to this rank's shard, and nothing besides it that its caller
would meet beside sequence shards. Each check raises a ValueError naming the module, not a wrong gradient.
"""

from __future__ import annotations

from torch import Tensor, nn

from tpext.parallel import structure as st

__all__ = ["add_outside_layer_checks", "runs_before_split", "check_replicated_outputs"]


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
