"""Mixture-of-experts layers under tensor parallelism: every expert's intermediate features sharded.

A Hugging Face experts module (`@use_experts_implementation`: Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE,
GLM-4-MoE, ...) holds all experts' weights as 3-D parameters, gate_up_proj [E, 2I, H] ([gate; up] rows,
or interleaved gate/up pairs) and down_proj [E, H, I] ([E, H, 2I] / [E, I, H] when transposed), and is
called with the tokens, each token's top-k expert ids and their routing weights. Each expert is a
column-parallel layer followed by a row-parallel one, so each rank keeps its slice of every expert's
intermediate features (the same slice of gate and of up) and the matching input features of down_proj:
its output is a partial sum over its features, weighted per token by the routing weights, and one
all-reduce (copy_to_tp / reduce_from_tp around the module's own forward, the tokens and the routing
weights passing through copy_to_tp) gives the dense output and the dense gradients of the tokens and
of the routing weights. The router stays replicated: every rank routes the same tokens the same way.
Under SP, inside a mixture-of-experts block that reduces its output once (tpext.parallel.full_sequence), the module
returns its partial sum instead, unreduced (`_tpext_partial_output`).

Also accepted:
  * expert biases (GPT-OSS's): gate_up_proj_bias [E, 2I] (up_proj_bias [E, I]) is sliced with its
    intermediate features; down_proj_bias [E, H] stays whole and is added once, after the reduction, as
    the routing-weighted sum sum_k w[t, k] * b[idx[t, k]] (the module's own forward runs with zeros in its
    place, so the reduction does not count it R times; its gradient and the routing weights' gradient
    from it are computed once, from the replicated output gradient);
  * experts called with the routed tokens alone (Llama 4's: tokens already weighted and laid out
    expert by expert, [E * tokens, H]);
  * weights whose layout the module does not declare (no is_transposed / is_concatenated): the layout is
    read from the shapes, and where gate and up may be concatenated or interleaved, the one whose sums
    check out on the module's own forward is taken.

`shard_experts` keeps the module's class and code (its experts implementation: eager, grouped_mm,
batched_mm) and checks first, on copies of its eager forward with random weights (and biases), that the
ranks' outputs (plus the down bias, added once) add up to the dense one.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group, shard_range
from tpext.nn.class_swap import derived_class, probe_disagrees, shell_copy
from tpext.sharding import ShardLayout, set_layout

__all__ = ["shard_experts", "is_experts"]


class _ShardedExperts(SharesGroupOnCopy):
    """Wraps an experts module's own class: its forward on this rank's intermediate features of every expert,
    the tokens and routing weights entering through copy_to_tp, the weighted sum leaving through
    reduce_from_tp."""

    _tpext_group: dist.ProcessGroup
    #: True: return this rank's partial sum, unreduced, for a caller that reduces the block's output once
    #: (a mixture-of-experts block under SP, tpext.parallel.full_sequence): the tokens and routing weights enter
    #: without copy_to_tp (their gradients stay partial sums too), and the down bias term is added on rank 0
    #: only, its gradient summed over the group.
    _tpext_partial_output: bool = False

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        # (hidden_states, top_k_index, top_k_weights) for most; (hidden_states,) for Llama 4's, whose
        # tokens come weighted by their routing weights.
        args = list(args)
        for name in _forward_params(self)[1 + len(args) :]:  # routing arguments passed by name: positional
            if name not in kwargs:
                break
            args.append(kwargs.pop(name))
        index, weights = (args[0], args[1]) if len(args) >= 2 else (None, None)
        if self._tpext_partial_output:
            return self._partial_forward(hidden_states, index, weights, args, kwargs)
        with stats.scope_for(self):
            local_args = (
                mappings.copy_to_tp(hidden_states, self._tpext_group),
                *(mappings.copy_to_tp(a, self._tpext_group) if a is weights else a for a in args),
            )
        bias = self._parameters.get("down_proj_bias")
        if bias is None:
            partial = super().forward(*local_args, **kwargs)
        else:  # the module's code with no down bias: each rank's output is a partial sum without it
            self.__dict__["down_proj_bias"] = torch.zeros_like(bias)
            try:
                partial = super().forward(*local_args, **kwargs)
            finally:
                del self.__dict__["down_proj_bias"]
        with stats.scope_for(self):
            out = mappings.reduce_from_tp(partial, self._tpext_group)
        if bias is not None:  # once, after the reduction: sum_k w[t, k] * b[idx[t, k]]
            out = out + (weights.unsqueeze(-1) * bias[index]).sum(-2).to(out.dtype)
        return out

    def _partial_forward(self, hidden_states: Tensor, index, weights, args: list, kwargs: dict) -> Tensor:
        """This rank's partial sum of the output (plus, on rank 0, the routing-weighted down bias)."""
        bias = self._parameters.get("down_proj_bias")
        if bias is None:
            return super().forward(hidden_states, *args, **kwargs)
        self.__dict__["down_proj_bias"] = torch.zeros_like(bias)
        try:
            partial = super().forward(hidden_states, *args, **kwargs)
        finally:
            del self.__dict__["down_proj_bias"]
        with stats.scope_for(self):
            bias = mappings.copy_to_tp(bias, self._tpext_group)  # backward: rank 0's gradient, summed
        if self._tpext_group.rank() != 0:
            bias = bias * 0  # every rank runs the same graph (and the same backward collectives)
        return partial + (weights.unsqueeze(-1) * bias[index]).sum(-2).to(partial.dtype)

    def extra_repr(self) -> str:
        inner = super().extra_repr()
        local = self._tpext_layouts["down_proj"].local_shape
        return f"{inner}{', ' if inner else ''}tp={self._tpext_group.size()}, local down_proj={local}"


def _input_weight(experts: nn.Module) -> str:
    return "gate_up_proj" if isinstance(getattr(experts, "gate_up_proj", None), Tensor) else "up_proj"


def is_experts(module: nn.Module) -> bool:
    """Whether `module` holds mixture-of-experts weights as 3-D parameters: down_proj and gate_up_proj (or
    up_proj), one matrix per expert."""
    params = dict(module.named_parameters(recurse=False))
    up, down = params.get(_input_weight(module)), params.get("down_proj")
    return (
        up is not None and down is not None and up.dim() == down.dim() == 3 and up.shape[0] == down.shape[0]
    )


def _is_transposed(experts: nn.Module) -> bool:
    """Whether the weights are [E, H, kI] / [E, I, H] (k = 2 for gate_up_proj): as the module declares, or
    else as its shapes say ([E, kI, H] / [E, H, I], Hugging Face's default, where they say either)."""
    declared = getattr(experts, "is_transposed", None)
    if declared is not None:
        return bool(declared)
    up, down = getattr(experts, _input_weight(experts)), experts.down_proj
    k = 2 if _input_weight(experts) == "gate_up_proj" else 1
    plain = up.shape[1] == k * down.shape[2] and up.shape[2] == down.shape[1]
    transposed = up.shape[2] == k * down.shape[1] and up.shape[1] == down.shape[2]
    return transposed and not plain


def _layouts(
    experts: nn.Module, world: int, rank: int, concatenated: bool | None = None
) -> dict[str, ShardLayout]:
    """The layouts of this rank's intermediate features in the experts' weights (and in gate_up_proj_bias);
    ValueError for weights that are not the layout Hugging Face's experts declare. concatenated: gate and up
    rows as [gate; up] (True) or interleaved (False); None: as the module declares (default [gate; up])."""
    cls, up_name = type(experts).__name__, _input_weight(experts)
    up, down = getattr(experts, up_name), experts.down_proj
    transposed = _is_transposed(experts)
    up_dim, down_dim = (2, 1) if transposed else (1, 2)
    inter = down.shape[down_dim]
    gated = up_name == "gate_up_proj"
    if up.shape[up_dim] != (2 if gated else 1) * inter or up.shape[3 - up_dim] != down.shape[3 - down_dim]:
        raise ValueError(
            f"tpext: cannot shard {cls}: {up_name} {list(up.shape)} and down_proj {list(down.shape)} "
            f"are not [E, {'2I' if gated else 'I'}, H] and [E, H, I]{' transposed' if transposed else ''}"
        )
    if inter % world:
        raise ValueError(
            f"tpext: cannot shard {cls} over {world} ranks: its experts' intermediate size {inter} is "
            f"not divisible by {world}; pick a tensor-parallel size that divides it"
        )
    start, count = shard_range(inter, world, rank)
    if concatenated is None:
        concatenated = bool(getattr(experts, "is_concatenated", True))
    if not gated:
        up_segments = ((start, count),)
    elif concatenated:  # [gate; up]
        up_segments = ((start, count), (inter + start, count))
    else:  # gate and up rows interleaved: this rank's pairs
        up_segments = ((2 * start, 2 * count),)
    layouts = {
        up_name: ShardLayout(tuple(up.shape), up_dim, up_segments),
        "down_proj": ShardLayout(tuple(down.shape), down_dim, ((start, count),)),
    }
    bias = experts._parameters.get(f"{up_name}_bias")
    if bias is not None:
        if tuple(bias.shape) != (up.shape[0], up.shape[up_dim]):
            raise ValueError(
                f"tpext: cannot shard {cls}: {up_name}_bias {list(bias.shape)} is not "
                f"[E, {'2I' if gated else 'I'}] = {[up.shape[0], up.shape[up_dim]]}"
            )
        layouts[f"{up_name}_bias"] = ShardLayout(tuple(bias.shape), 1, up_segments)
    return layouts


def _down_bias_ok(experts: nn.Module) -> str | None:
    """Why the module's down_proj_bias cannot be added once after the reduction, or None (also when it has none)."""
    bias = experts._parameters.get("down_proj_bias")
    if bias is None:
        return None
    down = experts.down_proj
    hidden = down.shape[2 if _is_transposed(experts) else 1]
    if tuple(bias.shape) != (down.shape[0], hidden):
        return f"down_proj_bias {list(bias.shape)} is not [E, H] = {[down.shape[0], hidden]}"
    if len(_forward_params(experts)) < 3:
        return "a down_proj_bias, and no routing weights passed to it to weight the bias with"
    return None


def _forward_params(experts: nn.Module) -> list[str]:
    """The names of the positional parameters of the module's eager forward, after self."""
    eager = getattr(type(experts).forward, "__wrapped__", type(experts).forward)
    params = list(inspect.signature(eager).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


_INTERMEDIATE_ATTRS = ("intermediate_dim", "intermediate_size")
_HIDDEN_ATTRS = ("hidden_dim", "hidden_size")


def _set_sizes(experts: nn.Module, dense_inter: int, inter: int, hidden: int | None = None) -> None:
    """Set the size attributes the module may read in forward: its intermediate size (where it holds the dense
    one) to `inter`, and its hidden size to `hidden`."""
    for attr in _INTERMEDIATE_ATTRS:
        if getattr(experts, attr, None) == dense_inter:
            setattr(experts, attr, inter)
    for attr in _HIDDEN_ATTRS if hidden is not None else ():
        if isinstance(getattr(experts, attr, None), int):
            setattr(experts, attr, hidden)


def _sums_disagree(experts: nn.Module, world: int, concatenated: bool | None) -> str:
    """Run the module's eager forward (the code its other experts implementations reproduce; some need a GPU or
    a package) on copies with random weights and biases, at its intermediate size and hidden size 8: the
    ranks' sliced outputs, plus the down bias once, must add up to the dense output. Returns why not, or ""."""
    up_name = _input_weight(experts)
    up, down = getattr(experts, up_name), experts.down_proj
    transposed = _is_transposed(experts)
    n_experts, hidden, inter = up.shape[0], 8, down.shape[1 if transposed else 2]
    gen = torch.Generator().manual_seed(0)
    up_rows = (2 if up_name == "gate_up_proj" else 1) * inter
    small = {
        up_name: (n_experts, hidden, up_rows) if transposed else (n_experts, up_rows, hidden),
        "down_proj": (n_experts, inter, hidden) if transposed else (n_experts, hidden, inter),
    }
    if f"{up_name}_bias" in experts._parameters:
        small[f"{up_name}_bias"] = (n_experts, up_rows)
    if "down_proj_bias" in experts._parameters:
        small["down_proj_bias"] = (n_experts, hidden)
    dense = {name: torch.randn(shape, generator=gen) for name, shape in small.items()}
    tokens, top_k = 6, min(2, n_experts)
    routed_only = len(_forward_params(experts)) < 3  # Llama 4's: the weighted tokens, expert by expert
    x = torch.randn(n_experts * tokens if routed_only else tokens, hidden, generator=gen)
    index = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    args = (x,) if routed_only else (x, index, weights)
    eager = getattr(
        type(experts).forward, "__wrapped__", type(experts).forward
    )  # under @use_experts_implementation

    def copy_with(params: dict[str, Tensor], local_inter: int) -> nn.Module:
        new = shell_copy(experts)
        new._parameters.update({name: nn.Parameter(t) for name, t in params.items()})
        new.is_transposed = transposed  # as read from the module's own shapes
        _set_sizes(new, inter, local_inter, hidden)
        return new

    def dense_and_summed() -> tuple[Tensor, Tensor]:
        probe = copy_with(dense, inter)
        ranks = []
        for r in range(world):
            local = {
                n: lay.local_from_dense(dense[n])
                for n, lay in _layouts(probe, world, r, concatenated).items()
            }
            if "down_proj_bias" in dense:
                local["down_proj_bias"] = torch.zeros_like(dense["down_proj_bias"])
            ranks.append(copy_with(local, inter // world))
        summed = sum(eager(rank, *args) for rank in ranks)
        if "down_proj_bias" in dense:
            summed = summed + (weights.unsqueeze(-1) * dense["down_proj_bias"][index]).sum(-2)
        return summed, eager(probe, *args)

    return probe_disagrees(dense_and_summed, rtol=1e-4, atol=1e-5, differs="they differ")


def _checked_layout(experts: nn.Module, world: int) -> bool | None:
    """The gate/up layout (concatenated or not, None: as declared) whose sums check out; ValueError if none."""
    declared = getattr(experts, "is_concatenated", None) is not None or _input_weight(experts) == "up_proj"
    candidates = (None,) if declared else (True, False)
    reasons = []
    for concatenated in candidates:
        why = _sums_disagree(experts, world, concatenated)
        if not why:
            return concatenated
        reasons.append(why)
    raise ValueError(
        f"tpext: cannot shard {type(experts).__name__}: its outputs on slices of every expert's "
        f"intermediate features do not add up to its output ({reasons[0]}"
        f"{'' if declared else ', with gate and up rows concatenated or interleaved'}); "
        "give it the style 'replicate'"
    )


def _check_grouped_mm(experts: nn.Module, local_inter: int, world: int) -> None:
    """grouped_mm (transformers' default experts implementation) needs rows of a multiple of 16 bytes: this
    rank's intermediate features must make one."""
    config = getattr(experts, "config", None)
    itemsize = experts.down_proj.element_size()
    if getattr(config, "_experts_implementation", None) == "grouped_mm" and (local_inter * itemsize) % 16:
        raise ValueError(
            f"tpext: cannot shard {type(experts).__name__} over {world} ranks with "
            f"experts_implementation='grouped_mm': it needs rows of a multiple of 16 bytes, and this "
            f"rank's {local_inter} intermediate features of {experts.down_proj.dtype} make "
            f"{local_inter * itemsize}; pick a tensor-parallel size that leaves a multiple of "
            f"{16 // itemsize} features per rank, or load the model with "
            "experts_implementation='batched_mm' (or 'eager')"
        )


def shard_experts(experts: nn.Module, group: GroupLike = None) -> nn.Module:
    """A copy of `experts` (a model's own mixture-of-experts module with 3-D weights) holding this rank's slice
    of every expert's intermediate features, whose output is all-reduced: the dense output and gradients.

    Args:
        experts: a module with 3-D gate_up_proj (or up_proj) and down_proj parameters, one matrix per expert,
            optionally gate_up_proj_bias [E, 2I] (sliced with its features) and down_proj_bias [E, H] (kept
            whole, added once after the reduction, weighted by the routing weights).
        group: a ProcessGroup, a 1-D DeviceMesh, or None for the world.

    Returns:
        The sharded copy (its class and code kept); a group of size 1 returns `experts` as it is.

    Raises:
        ValueError: naming the module, for weights it cannot slice (a norm after each expert, per-expert
            buffers, other parameters), sizes the group does not divide, or a forward whose outputs on the
            slices do not add up to its output.

    Example:
        >>> block.experts = tpext.nn.shard_experts(block.experts)  # the router beside it stays replicated
    """
    pg = resolve_group(group)
    cls = type(experts).__name__
    if not is_experts(experts):
        raise ValueError(
            f"tpext: cannot shard {cls} as experts: it needs 3-D down_proj and gate_up_proj (or "
            "up_proj) parameters, one matrix per expert"
        )
    if pg.size() == 1:
        return experts
    layouts = _layouts(experts, pg.size(), pg.rank())
    others = sorted(n for n, _ in experts.named_parameters() if n not in layouts and n != "down_proj_bias")
    buffers = sorted(n for n, _ in experts.named_buffers())
    if others or buffers or getattr(experts, "has_post_expert_norm", False):
        raise ValueError(
            f"tpext: cannot shard {cls}: besides {sorted(layouts)} it has "
            f"{others + buffers or 'a norm after each expert'}, which tpext does not slice (a norm "
            "over the whole output would need the reduced output); give it the style 'replicate'"
        )
    if getattr(experts, "has_bias", False) and "down_proj_bias" not in experts._parameters:
        raise ValueError(
            f"tpext: cannot shard {cls}: it declares biases (has_bias) but holds no down_proj_bias "
            "parameter tpext can add after the reduction; give it the style 'replicate'"
        )
    why = _down_bias_ok(experts)
    if why:
        raise ValueError(f"tpext: cannot shard {cls}: {why}; give it the style 'replicate'")
    down = layouts["down_proj"]
    _check_grouped_mm(experts, down.local_shape[down.dim], pg.size())
    concatenated = _checked_layout(experts, pg.size())
    layouts = _layouts(experts, pg.size(), pg.rank(), concatenated)
    new = shell_copy(experts)
    new.__class__ = derived_class(type(experts), _ShardedExperts, wraps=True)
    new._tpext_group = pg
    for name, layout in layouts.items():
        p = experts._parameters[name]
        new._parameters[name] = nn.Parameter(
            layout.local_from_dense(p.detach()).clone(), requires_grad=p.requires_grad
        )
        set_layout(new, name, layout)
    _set_sizes(new, down.dense_shape[down.dim], down.local_shape[down.dim])
    return new
