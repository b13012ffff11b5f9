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

`shard_experts` keeps the module's class and code (its experts implementation: eager, grouped_mm,
batched_mm) and checks first, on copies of its eager forward with random weights, that the ranks'
outputs add up to the dense one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tpext import mappings, stats
from tpext.distributed import GroupLike, SharesGroupOnCopy, resolve_group, shard_range
from tpext.nn._class_swap import derived_class, probe_disagrees, shell_copy
from tpext.sharding import ShardLayout, set_layout

__all__ = ["shard_experts", "is_experts"]


class _ShardedExperts(SharesGroupOnCopy):
    """Wraps an experts module's own class: its forward on this rank's intermediate features of every expert,
    the tokens and routing weights entering through copy_to_tp, the weighted sum leaving through
    reduce_from_tp."""

    _tpext_group: dist.ProcessGroup

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, *args, **kwargs) -> Tensor:
        with stats.scope_for(self):
            hidden_states = mappings.copy_to_tp(hidden_states, self._tpext_group)
            top_k_weights = mappings.copy_to_tp(top_k_weights, self._tpext_group)
        partial = super().forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        with stats.scope_for(self):
            return mappings.reduce_from_tp(partial, self._tpext_group)

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
    return up is not None and down is not None and up.dim() == down.dim() == 3 and up.shape[0] == down.shape[0]


def _layouts(experts: nn.Module, world: int, rank: int) -> dict[str, ShardLayout]:
    """The layouts of this rank's intermediate features in the experts' weights; ValueError for weights
    that are not the layout Hugging Face's experts declare."""
    cls, up_name = type(experts).__name__, _input_weight(experts)
    up, down = getattr(experts, up_name), experts.down_proj
    transposed = bool(getattr(experts, "is_transposed", False))
    up_dim, down_dim = (2, 1) if transposed else (1, 2)
    inter = down.shape[down_dim]
    gated = up_name == "gate_up_proj"
    if up.shape[up_dim] != (2 if gated else 1) * inter or up.shape[3 - up_dim] != down.shape[3 - down_dim]:
        raise ValueError(f"tpext: cannot shard {cls}: {up_name} {list(up.shape)} and down_proj {list(down.shape)} "
                         f"are not [E, {'2I' if gated else 'I'}, H] and [E, H, I]{' transposed' if transposed else ''}")
    if inter % world:
        raise ValueError(f"tpext: cannot shard {cls} over {world} ranks: its experts' intermediate size {inter} is "
                         f"not divisible by {world}; pick a tensor-parallel size that divides it")
    start, count = shard_range(inter, world, rank)
    if not gated:
        up_segments = ((start, count),)
    elif getattr(experts, "is_concatenated", True):  # [gate; up]
        up_segments = ((start, count), (inter + start, count))
    else:  # gate and up rows interleaved: this rank's pairs
        up_segments = ((2 * start, 2 * count),)
    return {up_name: ShardLayout(tuple(up.shape), up_dim, up_segments),
            "down_proj": ShardLayout(tuple(down.shape), down_dim, ((start, count),))}


_INTERMEDIATE_ATTRS = ("intermediate_dim", "intermediate_size")
_HIDDEN_ATTRS = ("hidden_dim", "hidden_size")


def _set_sizes(experts: nn.Module, dense_inter: int, inter: int, hidden: Optional[int] = None) -> None:
    """Set the size attributes the module may read in forward: its intermediate size (where it holds the dense
    one) to `inter`, and its hidden size to `hidden`."""
    for attr in _INTERMEDIATE_ATTRS:
        if getattr(experts, attr, None) == dense_inter:
            setattr(experts, attr, inter)
    for attr in _HIDDEN_ATTRS if hidden is not None else ():
        if isinstance(getattr(experts, attr, None), int):
            setattr(experts, attr, hidden)


def _check_sums(experts: nn.Module, world: int) -> None:
    """Run the module's eager forward (the code its other experts implementations reproduce; some need a GPU or
    a package) on copies with random weights, at its intermediate size and hidden size 8: the ranks' sliced
    outputs must add up to the dense output."""
    cls, up_name = type(experts).__name__, _input_weight(experts)
    up, down = getattr(experts, up_name), experts.down_proj
    transposed = bool(getattr(experts, "is_transposed", False))
    n_experts, hidden, inter = up.shape[0], 8, down.shape[1 if transposed else 2]
    gen = torch.Generator().manual_seed(0)
    up_rows = (2 if up_name == "gate_up_proj" else 1) * inter
    small = {up_name: (n_experts, hidden, up_rows) if transposed else (n_experts, up_rows, hidden),
             "down_proj": (n_experts, inter, hidden) if transposed else (n_experts, hidden, inter)}
    dense = {name: torch.randn(shape, generator=gen) for name, shape in small.items()}
    tokens, top_k = 6, min(2, n_experts)
    x = torch.randn(tokens, hidden, generator=gen)
    index = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    eager = getattr(type(experts).forward, "__wrapped__", type(experts).forward)  # under @use_experts_implementation

    def copy_with(params: dict[str, Tensor], local_inter: int) -> nn.Module:
        new = shell_copy(experts)
        new._parameters.update({name: nn.Parameter(t) for name, t in params.items()})
        _set_sizes(new, inter, local_inter, hidden)
        return new

    def dense_and_summed() -> tuple[Tensor, Tensor]:
        probe = copy_with(dense, inter)
        ranks = [copy_with({n: lay.local_from_dense(dense[n]) for n, lay in _layouts(probe, world, r).items()},
                           inter // world) for r in range(world)]
        return sum(eager(rank, x, index, weights) for rank in ranks), eager(probe, x, index, weights)

    why = probe_disagrees(dense_and_summed, rtol=1e-4, atol=1e-5, differs="they differ")
    if why:
        raise ValueError(f"tpext: cannot shard {cls}: its outputs on slices of every expert's intermediate features "
                         f"do not add up to its output ({why}); give it the style 'replicate'")


def _check_grouped_mm(experts: nn.Module, local_inter: int, world: int) -> None:
    """grouped_mm (transformers' default experts implementation) needs rows of a multiple of 16 bytes: this
    rank's intermediate features must make one."""
    config = getattr(experts, "config", None)
    itemsize = experts.down_proj.element_size()
    if getattr(config, "_experts_implementation", None) == "grouped_mm" and (local_inter * itemsize) % 16:
        raise ValueError(f"tpext: cannot shard {type(experts).__name__} over {world} ranks with "
                         f"experts_implementation='grouped_mm': it needs rows of a multiple of 16 bytes, and this "
                         f"rank's {local_inter} intermediate features of {experts.down_proj.dtype} make "
                         f"{local_inter * itemsize}; pick a tensor-parallel size that leaves a multiple of "
                         f"{16 // itemsize} features per rank, or load the model with "
                         "experts_implementation='batched_mm' (or 'eager')")


def shard_experts(experts: nn.Module, group: GroupLike = None) -> nn.Module:
    """A copy of `experts` (a model's own mixture-of-experts module with 3-D weights) holding this rank's slice
    of every expert's intermediate features, whose output is all-reduced: the dense output and gradients.
    Its class and code are kept. A group of size 1 returns `experts` as it is; weights it cannot slice
    (biases, a norm after each expert, per-expert buffers) raise ValueError."""
    pg = resolve_group(group)
    cls = type(experts).__name__
    if not is_experts(experts):
        raise ValueError(f"tpext: cannot shard {cls} as experts: it needs 3-D down_proj and gate_up_proj (or "
                         "up_proj) parameters, one matrix per expert")
    if pg.size() == 1:
        return experts
    layouts = _layouts(experts, pg.size(), pg.rank())
    others = sorted(n for n, _ in experts.named_parameters() if n not in layouts)
    buffers = sorted(n for n, _ in experts.named_buffers())
    if others or buffers or getattr(experts, "has_bias", False) or getattr(experts, "has_post_expert_norm", False):
        raise ValueError(f"tpext: cannot shard {cls}: besides {sorted(layouts)} it has "
                         f"{others + buffers or 'biases or a norm after each expert'}, which tpext does not "
                         "slice (a bias added once, or a norm over the whole output, would need the reduced "
                         "output); give it the style 'replicate'")
    down = layouts["down_proj"]
    _check_grouped_mm(experts, down.local_shape[down.dim], pg.size())
    _check_sums(experts, pg.size())
    new = shell_copy(experts)
    new.__class__ = derived_class(type(experts), _ShardedExperts, wraps=True)
    new._tpext_group = pg
    for name, layout in layouts.items():
        p = experts._parameters[name]
        new._parameters[name] = nn.Parameter(layout.local_from_dense(p.detach()).clone(), requires_grad=p.requires_grad)
        set_layout(new, name, layout)
    _set_sizes(new, down.dense_shape[down.dim], down.local_shape[down.dim])
    return new
