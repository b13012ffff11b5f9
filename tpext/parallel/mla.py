"""Multi-head latent attention (MLA: DeepSeek-V2/V3's, and the families built on it), read and parallelized.

An MLA attention module projects the hidden states down to low-rank latents, normalises them, and projects
them up to its heads; its keys share one rotary part over all heads:

    x -> q_a_proj -> q_a_layernorm -> q_b_proj      [heads x (qk_nope + qk_rope)]   (or one q_proj)
    x -> kv_a_proj_with_mqa -> [kv latent | k_rot]
         kv latent -> kv_a_layernorm -> kv_b_proj  [heads x (qk_nope + v)]
         k_rot: one rotary key, shared by every head
    attention -> o_proj                            [heads x v -> hidden]

Tensor-parallel, by heads: q_proj / q_b_proj and kv_b_proj are column-parallel (qk_nope + qk_rope and
qk_nope + v features a head), o_proj row-parallel (v features a head). The down projections and their norms
are replicated: every rank computes the whole latent. The up projections' backward all-reduces the latents'
gradients; k_rot bypasses them and reaches only this rank's heads, so kv_a_proj_with_mqa sums the gradient
of its k_rot features over the group (`MLAKvAProj`, Hugging Face's "mla_kv_a_proj"). Extra modules some
families add: an output gate per head (gate_proj, v features a head: column-parallel), a sparse-attention
indexer (replicated: it reads the hidden states and the q latent, both whole on every rank), one value per
head on the attention module itself (sinks: sliced with the heads by parallelize).

Under sequence parallelism the attention module reads the gathered sequence (tpext.parallel.sequence): the
replicated down projections compute on it alike on every rank, so their input gradient is whole, not partial,
and each rank keeps its own block of it (`REPLICATED_READERS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from tpext import mappings, stats
from tpext.distributed import SharesGroupOnCopy, resolve_group
from tpext.nn.class_swap import derived_class, shell_copy
from tpext.parallel import structure as st
from tpext.parallel.styles import Colwise, Replicate, Rowwise, Site, Style
from tpext.sharding import Piece

__all__ = ["MLADims", "MLAKvAProj", "is_mla", "dims", "plan_entries", "check_converted", "REPLICATED_READERS"]

#: Children of an MLA attention module with replicated weights that read its input, the hidden states.
REPLICATED_READERS = ("q_a_proj", "kv_a_proj_with_mqa", "indexer")
# Sparse-attention indexers (DeepSeek-V3.2's, HunYuan V4's): replicated with all they hold.
_INDEXERS = ("indexer",)


class MLADims(NamedTuple):
    """An MLA attention module's head structure."""

    heads: int
    qk_nope: int
    qk_rope: int
    v: int

    @property
    def qk(self) -> int:
        return self.qk_nope + self.qk_rope


def is_mla(module: nn.Module) -> bool:
    """Whether `module` is an MLA attention module.

    Args:
        module: any module.

    Returns:
        True when it holds kv_a_proj_with_mqa, kv_b_proj and o_proj (linear layers, or their tensor-parallel
        replacements).

    Example:
        >>> mla.is_mla(model.model.layers[0].self_attn)  # a DeepseekV3Attention
        True
    """
    return all(
        isinstance(getattr(module, n, None), nn.Module) for n in ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    )


def dims(attn: nn.Module, config=None) -> MLADims:
    """The head count and per-head sizes of an MLA attention module, from its attributes or the config,
    checked against its projections' shapes.

    Args:
        attn: an MLA attention module (`is_mla`).
        config: the model's config (read where the module lacks an attribute).

    Returns:
        MLADims(heads, qk_nope, qk_rope, v).

    Raises:
        ValueError: a size is missing, or the projections' shapes disagree with the sizes.

    Example:
        >>> mla.dims(model.model.layers[0].self_attn, model.config)
        MLADims(heads=8, qk_nope=8, qk_rope=4, v=6)
    """
    sources = (attn, getattr(attn, "config", None), config, getattr(config, "text_config", None))

    def pick(name):
        for obj in sources:
            v = getattr(obj, name, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    heads = pick("num_heads") or pick("num_attention_heads")
    sizes = {n: pick(n) for n in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
    if not heads or any(v is None for v in sizes.values()):
        missing = [n for n, v in {"num_heads": heads, **sizes}.items() if not v and v != 0]
        raise ValueError(
            f"tpext.parallelize: MLA attention {type(attn).__name__}: cannot tell {', '.join(missing)} "
            "from the module or the model config; give it a plan with the pieces of its projections"
        )
    d = MLADims(heads, sizes["qk_nope_head_dim"], sizes["qk_rope_head_dim"], sizes["v_head_dim"])
    expected = {
        "q_proj": ("out_features", d.heads * d.qk),
        "q_b_proj": ("out_features", d.heads * d.qk),
        "kv_b_proj": ("out_features", d.heads * (d.qk_nope + d.v)),
        "o_proj": ("in_features", d.heads * d.v),
    }
    for leaf, (attr, want) in expected.items():
        layer = getattr(attn, leaf, None)
        if isinstance(layer, nn.Linear) and getattr(layer, attr) != want:
            raise ValueError(
                f"tpext.parallelize: MLA attention {type(attn).__name__}.{leaf} has {attr}="
                f"{getattr(layer, attr)}, expected {want} for {d}; give it a plan with the pieces of "
                "its projections"
            )
    kv_a = attn.kv_a_proj_with_mqa
    if kv_a.out_features <= d.qk_rope:
        raise ValueError(
            f"tpext.parallelize: MLA attention {type(attn).__name__}.kv_a_proj_with_mqa has "
            f"{kv_a.out_features} output features, not a latent and {d.qk_rope} rotary features"
        )
    return d


def plan_entries(modules: dict[str, nn.Module], config=None) -> dict[str, Style]:
    """The plan entries of every MLA attention module among `modules` and what it holds (see the module's
    docstring); modules of an MLA attention this does not know are left out.

    Args:
        modules: {name: module} of a model (dict(model.named_modules())).
        config: the model's config (head sizes the modules lack).

    Returns:
        {module name: style}.

    Raises:
        ValueError: an MLA attention module whose sizes cannot be read or disagree with its projections
            (`dims`).

    Example:
        >>> mla.plan_entries(dict(model.named_modules()), model.config)["model.layers.0.self_attn.kv_b_proj"]
        Colwise(pieces=(Piece(units=8, unit_size=14),))
    """
    plan: dict[str, Style] = {}
    for name, attn in modules.items():
        if not is_mla(attn):
            continue
        d = dims(attn, config)
        prefix = f"{name}." if name else ""
        heads_of = {
            "q_proj": Colwise((Piece(d.heads, d.qk),)),
            "q_b_proj": Colwise((Piece(d.heads, d.qk),)),
            "kv_b_proj": Colwise((Piece(d.heads, d.qk_nope + d.v),)),
            "o_proj": Rowwise((Piece(d.heads, d.v),)),
            "q_a_proj": Replicate(),
            "q_a_layernorm": Replicate(),
            "kv_a_layernorm": Replicate(),
            "kv_a_proj_with_mqa": MLAKvAProj(d.qk_rope),
        }
        for leaf, style in heads_of.items():
            if isinstance(getattr(attn, leaf, None), nn.Module):
                plan[prefix + leaf] = style
        gate = getattr(attn, "gate_proj", None)
        if isinstance(gate, nn.Linear) and gate.out_features == d.heads * d.v:  # an output gate per head
            plan[prefix + "gate_proj"] = Colwise((Piece(d.heads, d.v),))
        for leaf in _INDEXERS:
            indexer = getattr(attn, leaf, None)
            if isinstance(indexer, nn.Module):
                for sub, module in indexer.named_modules(prefix=prefix + leaf):
                    if any(True for _ in module.parameters(recurse=False)):
                        plan[sub] = Replicate()
        own = [n for n, _ in attn.named_parameters(recurse=False)]
        if own and set(own) <= set(st.per_head_params(attn, config)):
            # One value per head (sinks): parallelize slices them with the heads its projections keep.
            plan[name] = Replicate()
    return plan


def check_converted(name: str, attn: nn.Module, converted: dict[str, nn.Module], world: int) -> None:
    """Checks that an MLA attention module whose heads a plan shards sums the gradient of its shared rotary
    key over the group: its kv_a_proj_with_mqa converted by MLAKvAProj. Called by parallelize before any
    module is replaced.

    Args:
        name: the attention module's name in the model.
        attn: the dense attention module.
        converted: {module name: its replacement} of the plan.
        world: the tensor-parallel size.

    Raises:
        ValueError: the heads are sharded and kv_a_proj_with_mqa is not an MLAKvAProj's.

    Example:
        >>> mla.check_converted("model.layers.0.self_attn", attn, converted, 2)  # None, or ValueError
    """
    prefix = f"{name}." if name else ""
    if world == 1 or not any(prefix + p in converted for p in ("q_proj", "q_b_proj", "kv_b_proj", "o_proj")):
        return
    kv_a = converted.get(prefix + "kv_a_proj_with_mqa")
    if not isinstance(kv_a, _SharedRopeGrads):
        raise ValueError(
            f"tpext.parallelize: {prefix}kv_a_proj_with_mqa ({type(attn.kv_a_proj_with_mqa).__name__}) of "
            f"MLA attention {name or 'the model'} ({type(attn).__name__}): its heads are sharded, and the "
            "rotary key it computes reaches only this rank's heads, so its gradient must be summed over "
            "the group; give it tpext.parallel.mla.MLAKvAProj(qk_rope_head_dim) (plan='auto' does)"
        )


class _SharedRopeGrads(SharesGroupOnCopy):
    """Wraps kv_a_proj_with_mqa's own class (MLAKvAProj): its forward runs unchanged; backward, the gradient
    of its last `_tpext_rope` output features (k_rot, read by this rank's heads only) is summed over the
    group, and that of the latent (read by kv_b_proj, whose backward all-reduces already) is kept."""

    _tpext_group: torch.distributed.ProcessGroup
    _tpext_rope: int

    def forward(self, *args, **kwargs):
        y = super().forward(*args, **kwargs)
        latent, rope = y.split([y.shape[-1] - self._tpext_rope, self._tpext_rope], dim=-1)
        with stats.scope_for(self):
            rope = mappings.copy_to_tp(rope, self._tpext_group)
        return torch.cat([latent, rope], dim=-1)


@dataclass(frozen=True, repr=False)
class MLAKvAProj(Style):
    """An MLA attention's kv_a_proj_with_mqa ([kv latent | k_rot]): replicated, with the gradient of its
    last `rope` output features (the rotary key every head shares) summed over the group, since each rank's
    heads read it. Hugging Face's "mla_kv_a_proj".

    Example:
        >>> plan = {"*.kv_a_proj_with_mqa": tpext.parallel.mla.MLAKvAProj(rope=64), ...}
    """

    kind: ClassVar[str] = "mla_kv_a_proj"
    rope: int = 0

    def convert(self, module: nn.Module, site: Site) -> nn.Module:
        if not (isinstance(module, nn.Linear) and st.plain_linear(module)):
            raise site.refuse(self, module, "it takes a plain nn.Linear (x @ W.T + b)")
        if not 0 < self.rope < module.out_features:
            raise site.refuse(
                self,
                module,
                f"its {module.out_features} output features cannot end with {self.rope} rotary ones; "
                "give MLAKvAProj the model's qk_rope_head_dim",
            )
        pg = resolve_group(site.group)
        if pg.size() == 1:
            return module
        new = shell_copy(module)
        new.__class__ = derived_class(type(module), _SharedRopeGrads, wraps=True)
        new._tpext_group, new._tpext_rope = pg, self.rope
        return new
