"""`tpext.parallelize(model)`: a dense model becomes a tensor-parallel one in place, same names, same numbers.

A plan maps module-name patterns to styles (tpext.parallel.styles: objects such as Colwise() or their
names "colwise", "rowwise", "vocab", "sequence_parallel", "replicate", "experts"; a Style of your own for
a layer of your own); `plan="auto"` builds one from the model's own TP plan and its names (`auto_plan`).

Grouped-query attention: with tp <= kv heads the kv heads are sharded (tp must divide them); with
tp > kv heads each kv head is replicated over tp / kv ranks (tp must be a multiple), and the gradients
of the replicas are summed. Attention modules get their local head counts (`num_heads`,
`num_key_value_heads`, `num_key_value_groups`, and in a view of their `config`).

Sequence parallelism (sequence_parallel=True): between the row-parallel output and the next
column-parallel input, activations are sequence shards; for batch-first [b, s, h] models the sharded
dim is 1 (`sequence_dim`), and s must be divisible by the tensor-parallel size. The sequence is split
at the input of the first decoder layer and each attention module is called with the full sequence,
gathered by its q/k/v projections (tpext.parallel.sequence), so model code that takes shapes from its
activations (Hugging Face's) sees the dense ones. Modules registered before the first decoder layer
are taken to run before it, on the whole sequence (not sequence-parallel). A vocab-parallel lm_head
gathers the decoder stack's output itself (the hidden states the model returns are then sequence
shards); without one (a base model, a replicated classification head) the stack's output is gathered
back to the full sequence. A mixture-of-experts block (the parent of an experts module with 3-D weights)
runs on the full sequence too, gathered at its input: where its output is a sum of its experts' and row
layers' outputs (checked on its forward), each rank's partial sum is reduce-scattered at its output;
otherwise what it holds is converted without SP and its output is split. So does a block replicated whole
(`Replicate(full_sequence=True)`, which auto_plan gives a decoder layer's block it cannot shard: a Mamba
mixer whose heads tp does not divide): its output is the dense block's on every rank, so it is split, and
its gradients need no sum. A module auto_plan replicates outside the decoder layers (a vision tower) must
run before the split in each forward: called after it, it is an error (with or without SP, so is one
called inside a decoder layer). A sharded Mamba mixer (tpext.parallel.mamba) reads the gathered sequence
as attention does. With no sharded attention or mixer there is no split point: the model runs without SP
(parallelize warns).

Converted norms keep their own class and code (tpext.nn.sum_param_grads), except a q/k RMSNorm over
all heads' features (OLMo2's), which keeps its class and computes its statistic over the group (checked
against its own forward first); an nn.Embedding subclass keeps its forward around the vocab-parallel
lookup; an nn.Linear subclass with its own forward is refused.
"""

from __future__ import annotations

import warnings

from torch import nn

from tpext.distributed import GroupLike, resolve_group
from tpext.nn import ColumnParallelLinear, SharedInputColumns
from tpext.parallel import mamba, mla
from tpext.parallel import structure as st
from tpext.parallel.full_sequence import partial_sums_reason
from tpext.parallel.hf_hooks import add_alibi_slices, add_causal_lm_loss, add_dense_save_pretrained
from tpext.parallel.plans import (
    REPLICATED,
    PlanLike,
    auto_plan,
    style_for,
)
from tpext.parallel.replicated import LAYER_PARAMETERS, add_outside_layer_checks
from tpext.parallel.sequence import add_sequence_hooks
from tpext.parallel.styles import Replicate, Site
from tpext.parallel.wrappers import check_data_parallel_wrappers
from tpext.random import check_rng_in_step
from tpext.sharding import ShardLayout, get_layout, set_layout

__all__ = ["parallelize"]


def _sharded_attention(model: nn.Module, plan: PlanLike) -> list[str]:
    """The names of the attention modules (with input and output projections) whose projections the plan shards, in
    module order."""
    names = []
    for name, attn in model.named_modules():
        projections = [f"{name}.{p}" if name else p for p in st.ATTENTION_PROJECTIONS if hasattr(attn, p)]
        if (st.is_attention(attn) or mla.is_mla(attn)) and any(style_for(p, plan) for p in projections):
            names.append(name)
    return names


def _check_heads(model: nn.Module, attention: list[str], world: int) -> None:
    """Every attention module with a sharded projection must split its query heads evenly; checked
    before any module is replaced, so a bad size leaves the model as it was."""
    config = getattr(model, "config", None)
    for name in attention:
        attn = model.get_submodule(name)
        hq, hkv, _ = st.heads(attn, config)
        if st.grouped_qkv(attn) and hkv % world:
            raise ValueError(
                f"tpext.parallelize: {name or 'the model'} packs each of its {hkv} kv heads with its "
                f"query heads (query_key_value), and {hkv} is not divisible by the tensor-parallel "
                f"size {world}; each rank must hold whole groups: pick a size that divides {hkv}"
            )
        blocks = st.interleaved_blocks(attn)
        if blocks and (hq // blocks) % world:
            raise ValueError(
                f"tpext.parallelize: {name or 'the model'} interleaves its {hq} query heads in "
                f"{blocks} blocks of [q | v | k] (qkv_proj), and the {hq // blocks} heads of a block "
                f"are not divisible by the tensor-parallel size {world}; each rank takes its heads "
                f"of every block: pick a size that divides {hq // blocks}"
            )
        if hq % world:
            raise ValueError(
                f"tpext.parallelize: {name or 'the model'} has {hq} query heads, not divisible by the "
                f"tensor-parallel size {world}; each rank must hold whole query heads"
            )


def _set_local_heads(
    model: nn.Module, converted: dict[str, nn.Module], world: int, rank: int
) -> dict[str, tuple[int, int, int]]:
    """Attention modules whose projections were sharded compute with their local head counts. Returns, for
    attention with per-head position biases (ALiBi), {name: (argument, all heads, this rank's first head,
    its head count)}."""
    config = getattr(model, "config", None)
    alibi = {}
    for name, attn in model.named_modules():
        projections = [f"{name}.{p}" if name else p for p in st.ATTENTION_PROJECTIONS]
        if not any(p in converted for p in projections) or not (st.is_attention(attn) or mla.is_mla(attn)):
            continue
        hq, hkv, d = st.heads(attn, config)  # _check_heads made sure hq divides
        local_q, local_kv = hq // world, max(hkv // world, 1)
        per_head = st.per_head_params(attn, config) if world > 1 else []
        if (argument := st.alibi_argument(attn)) is not None:
            alibi[name] = (argument, hq, rank * local_q, local_q)
        # hidden_size: older Hugging Face attention reshapes its output to [b, s, self.hidden_size] (BERT's
        # to all_head_size, CTRL's to d_model_size).
        for attr, value in (
            ("num_heads", local_q),
            ("num_attention_heads", local_q),
            ("n_heads", local_q),
            ("n_head", local_q),
            ("hidden_size", local_q * d),
            ("embed_dim", local_q * d),
            ("split_size", local_q * d),
            ("all_head_size", local_q * d),
            ("d_model_size", local_q * d),
            ("num_key_value_heads", local_kv),
            ("num_kv_heads", local_kv),
            ("num_key_value_groups", local_q // local_kv),
        ):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if hasattr(getattr(attn, "config", None), "num_attention_heads"):
            heads = {"num_attention_heads": local_q, "num_key_value_heads": local_kv}
            attn.config = _LocalHeadsConfig(attn.config, heads)
        for pname in per_head:
            # One value per query head (GPT-OSS's attention sinks): this rank's heads' values.
            dense = getattr(attn, pname)
            local = nn.Parameter(
                dense.detach().narrow(0, rank * local_q, local_q).clone(), requires_grad=dense.requires_grad
            )
            setattr(attn, pname, local)
            set_layout(attn, pname, ShardLayout((hq,), 0, ((rank * local_q, local_q),)))
    return alibi


class _LocalHeadsConfig:
    """An attention module's view of the model config with this rank's head counts, for attention code that
    reads them from its config in forward (Phi3 splits its packed qkv at config.num_attention_heads *
    head_dim). Every other attribute, and every write, is the model's config itself."""

    def __init__(self, config, heads: dict[str, int]):
        self.__dict__.update(_tpext_config=config, _tpext_heads=heads)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy/pickle protocols stay this object's own
            raise AttributeError(name)
        heads = self.__dict__["_tpext_heads"]
        return heads[name] if name in heads else getattr(self.__dict__["_tpext_config"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.__dict__["_tpext_config"], name, value)


def parallelize(
    model: nn.Module,
    group: GroupLike = None,
    plan: str | PlanLike = "auto",
    *,
    sequence_parallel: bool = False,
    sequence_dim: int = 1,
    chunks: int | str = "auto",
    share_inputs: bool = True,
) -> nn.Module:
    """Convert `model` in place to tensor parallelism over `group` and return it. Weights are sharded from
    the dense ones (a meta-device model stays on meta, for tpext.load_checkpoint to fill). State-dict names
    are unchanged.

    Args:
        model: the dense model.
        group: a ProcessGroup, a 1-D DeviceMesh such as mesh["tp"], or None for the world.
        plan: "auto" (`auto_plan`: the model's own TP plan, then its module names), or {pattern: style} with
            styles as objects (tpext.parallel.Colwise(), a Style of your own) or their names ("colwise").
        sequence_parallel: activations between a row layer and the next column layer are sequence shards.
        sequence_dim: the sequence dim of the activations under SP (1 for batch-first [b, s, h]).
        chunks: the chunk count of the overlapped ops ("auto": the planner's).
        share_inputs: run q/k/v_proj (and gate/up_proj) as one GEMM on one gathered input
            (tpext.nn.SharedInputColumns); False keeps one GEMM, and one collective, per projection (under SP
            an attention module's input is still gathered once, by a plain all-gather before the projections).

    Returns:
        `model`, converted.

    Raises:
        ValueError: a module the plan names cannot be converted (the message names it, says why for its
            kind, and the way out), head counts or packed groups that the group size would cut, a model
            already parallelized. Every check runs before any module is replaced: an error leaves the model
            as it was.

    Example:
        >>> model = tpext.parallelize(transformers.GPT2LMHeadModel(config), sequence_parallel=False)
    """
    pg = resolve_group(group)
    # Every tpext module declares its layouts (tpext.sharding) or its group.
    already = [
        n for n, m in model.named_modules() if vars(m).get("_tpext_layouts") or vars(m).get("_tpext_group")
    ]
    if already:
        raise ValueError(
            f"tpext.parallelize: the model is already parallelized ({already[0]} is a "
            f"{type(model.get_submodule(already[0])).__name__}); parallelize the dense model once"
        )
    if plan == "auto":
        plan = auto_plan(model, sequence_parallel=sequence_parallel, tp_size=pg.size())
    elif isinstance(plan, str):
        raise ValueError(
            f"tpext.parallelize: plan must be 'auto' or a dict of pattern -> style, got {plan!r}"
        )
    attention = _sharded_attention(model, plan)
    _check_heads(model, attention, pg.size())
    # Mamba-2 mixers sharded by heads (tpext.parallel.mamba): planned whole, read under SP like attention.
    modules = dict(model.named_modules())
    mixers = mamba.check_converted(modules, {n: style_for(n, plan) for n in modules if n}, pg.size())
    # Under SP the sequence is split at the input of the first decoder layer (the layer holding the first
    # sharded attention module or mixer): what runs before it, the embedding and the model-level code that takes
    # positions and the attention mask from its output's shape, sees the full sequence as in the dense model.
    first = min(attention[:1] + mixers[:1], key=list(modules).index, default="")
    split_at = _first_layer(first) if sequence_parallel and pg.size() > 1 and first else ""
    if split_at and isinstance(model.get_submodule(split_at), (nn.ModuleList, nn.ModuleDict)):
        raise ValueError(
            f"tpext.parallelize: under sequence parallelism the sequence is split at the input of the layer "
            f"that holds the first attention module, and {attention[0]} sits in a list of attention modules "
            f"({split_at}, beside lists of the layer's other parts, as XLM's) with no layer module around it; "
            "parallelize without sequence_parallel"
        )
    # Without a sharded attention module or mixer (a model whose mixers are all replicated) there is no split
    # point: the whole model runs without SP (its norms and MLPs converted for the full sequence), and
    # parallelize warns.
    no_split = sequence_parallel and pg.size() > 1 and not first
    sequence_parallel = sequence_parallel and not no_split
    ties = _ties(model)
    config = getattr(model, "config", None)
    decoder_stack = st.decoder_stack(model, modules)  # read before the embedding is replaced
    # Under SP a mixture-of-experts block (its experts sharded or replicated, its router must see every
    # token) runs on the full sequence: what it holds is converted without SP.
    moe_blocks = {name for name, module in modules.items() if st.is_moe(module)} if split_at else set()
    full_sequence_blocks: list[str] = []
    # Under SP a replicated block that mixes the sequence (Replicate(full_sequence=True): a Mamba mixer) runs
    # on the full sequence too; its output is the dense block's on every rank, so it is split (not reduced).
    replicated_blocks: list[str] = []
    # Build every replacement first: an error leaves the model untouched.
    converted: dict[str, nn.Module] = {}
    on_shards: list[str] = []  # converted for the sequence shards: must run after the split
    in_sp_region = not split_at
    for name, module in modules.items():
        in_sp_region = in_sp_region or name == split_at
        style = style_for(name, plan) if name else None
        whole = isinstance(style, Replicate) and style.full_sequence
        in_replicated = any(name.startswith(b + ".") for b in replicated_blocks)
        if name in moe_blocks and in_sp_region and not whole and not in_replicated:
            full_sequence_blocks.append(name)
        if whole and split_at and in_sp_region and not in_replicated:
            if not name.startswith(split_at.rpartition(".")[0] + "."):
                raise ValueError(
                    f"tpext.parallelize: {name} ({type(module).__name__}) is replicated whole and registered "
                    f"after the first decoder layer {split_at} but outside its decoder stack, so under "
                    "sequence_parallel=True tpext cannot tell whether it sees the full sequence or this "
                    "rank's shard; parallelize with sequence_parallel=False"
                )
            if not any(name.startswith(b + ".") for b in full_sequence_blocks):
                replicated_blocks.append(name)
        if style is None or any(name.startswith(c + ".") for c in converted):
            continue
        sp = (
            sequence_parallel
            and in_sp_region
            and not any(name.startswith(b + ".") for b in full_sequence_blocks + replicated_blocks)
        )
        site = Site(name, modules[name.rpartition(".")[0]], pg, sp, sequence_dim, chunks, config)
        new = style.convert(module, site)
        if new is not module:
            new._tpext_stats_name = name  # comm_stats attributes its collectives to this name
            converted[name] = new
            if sp:
                on_shards.append(name)
    for name in attention:  # MLA: its shared rotary key's gradient summed (tpext.parallel.mla)
        if mla.is_mla(attn := model.get_submodule(name)):
            mla.check_converted(name, attn, converted, pg.size())
    # A block whose output is a sum of its layers' partial outputs reduces it once, at its output.
    partial_blocks = {n for n in full_sequence_blocks if not partial_sums_reason(model, n, converted)}
    _retie(model, ties, converted)
    for name, new in converted.items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    alibi = _set_local_heads(model, converted, pg.size(), pg.rank())
    mamba.set_local_sizes(model, mixers, pg)
    add_alibi_slices(model, alibi)
    if share_inputs:
        _share_inputs(model, converted)
    before_split = _replicated_before_split(plan)
    if split_at:
        add_sequence_hooks(
            model,
            split_at,
            attention,
            converted,
            pg,
            sequence_dim,
            full_sequence_blocks,
            on_shards,
            partial_blocks,
            replicated_blocks=replicated_blocks,
            before_split=before_split,
            mixers=mixers,
            layer_params=[
                n
                for n in plan
                if str(_sources_of(plan).get(n, "")).startswith(f"{REPLICATED}: {LAYER_PARAMETERS}")
            ],
        )
    add_outside_layer_checks(model, decoder_stack, before_split)
    _warn_replicated(model, plan, bool(split_at), no_split)
    add_causal_lm_loss(model, converted)
    add_dense_save_pretrained(model)
    check_rng_in_step(model, pg, type(model).__name__)  # dropout's masks drawn alike on every rank
    check_data_parallel_wrappers(model, pg, type(model).__name__)  # DDP / FSDP2 over the dp group only
    return model


def _first_layer(attention: str) -> str:
    """The decoder layer that holds the attention module `attention`: its nearest ancestor in a list of
    layers (BERT's bert.encoder.layer.0 for bert.encoder.layer.0.attention.self), else its parent."""
    parts = attention.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    return attention.rpartition(".")[0]


def _sources_of(plan: PlanLike) -> dict[str, str]:
    """{name: where its entry came from} of an auto_plan Plan ({} for a plain dict)."""
    return getattr(plan, "sources", {})


def _replicated_before_split(plan: PlanLike) -> list[str]:
    """The modules auto_plan replicated whole outside the decoder layers (Replicate(), source "replicated:",
    nothing planned under them): under SP they must run before the split."""
    sources = _sources_of(plan)
    return [
        name
        for name, style in plan.items()
        if str(sources.get(name, "")).startswith(REPLICATED + ":")
        and isinstance(style, Replicate)
        and not style.full_sequence
        and not any(other.startswith(name + ".") for other in plan)
    ]


def _warn_replicated(model: nn.Module, plan: PlanLike, split: bool, no_split: bool) -> None:
    """One warning per parallelize call: the blocks and modules auto_plan replicated (their weights and
    compute repeated on every rank), and under SP a model with no sharded attention to split the sequence
    at."""
    lines = []
    sources = _sources_of(plan)
    blocks = [name for name in plan if str(sources.get(name, "")).startswith(REPLICATED + ":")]
    if blocks:
        total = sum(p.numel() for p in model.parameters())
        # a module with planned children (a decoder layer's own scales) holds its own parameters only
        held = sum(
            p.numel()
            for b in blocks
            for p in model.get_submodule(b).parameters(
                recurse=not any(other.startswith(b + ".") for other in plan)
            )
        )
        lines.append(
            f"{len(blocks)} module(s) replicated, not sharded: their weights ({held} parameters, "
            f"{100 * held / max(total, 1):.0f}% of the model's) and their compute are repeated on every rank"
            + (
                ", and under sequence parallelism a decoder layer's block runs on the full sequence, and "
                "a module outside the layers must run before the sequence is split"
                if split
                else ""
            )
            + ":"
        )
        lines += [f"  {name}: {sources[name].removeprefix(REPLICATED + ': ')}" for name in blocks]
    if no_split:
        lines.append(
            "sequence_parallel=True has no effect: no sharded attention module to split the sequence at "
            "(the sequence is split at the first decoder layer with one); the model runs without sequence "
            "parallelism"
        )
    if lines:
        warnings.warn("tpext.parallelize: " + "\n".join(lines), stacklevel=3)


def _ties(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of (module name, parameter name) that share one dense parameter."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod_name, p_name))
    return [group for group in owners.values() if len(group) > 1]


def _retie(model: nn.Module, ties: list[list[tuple[str, str]]], converted: dict[str, nn.Module]) -> None:
    """Parameters tied in the dense model (e.g. embed_tokens and lm_head) stay tied: every owner (its
    replacement, if any) gets the first one's local parameter, which needs the same local layout on all
    of them. All groups are checked before any is tied, so an error changes nothing."""
    plans = []
    for group in ties:
        # A module the plan leaves as it is that holds a converted owner of the parameter (BERT's
        # cls.predictions, whose bias is its decoder's) shares that owner's local parameter and layout.
        held = [
            (m, p)
            for m, p in group
            if m not in converted and any(c in converted and c.startswith(f"{m}.") for c, _ in group)
        ]
        group = [g for g in group if g not in held]
        owners = [(converted.get(m) or model.get_submodule(m), p) for m, p in group]
        first = getattr(*owners[0])
        want = get_layout(owners[0][0], owners[0][1], first)
        for (module, p_name), (m_name, _) in zip(owners[1:], group[1:]):
            layout = get_layout(module, p_name, getattr(module, p_name))
            if layout != want:
                raise ValueError(
                    f"tpext.parallelize: {group[0][0]}.{group[0][1]} and {m_name}.{p_name} are tied in "
                    f"the dense model but the plan shards them differently ({want} vs {layout}); "
                    "give both the same sharding (e.g. 'vocab' for an embedding and its lm_head)"
                )
        plans.append((first, want, owners[1:], [(model.get_submodule(m), p) for m, p in held]))
    for first, want, owners, holders in plans:
        for module, p_name in owners:
            setattr(module, p_name, first)
        for module, p_name in holders:
            setattr(module, p_name, first)
            set_layout(module, p_name, want)


# Column-parallel siblings that read the same input in the Llama family's forward (and BERT's query / key /
# value, ...).
_SIBLINGS = (*st.QUERY_KEY_VALUE, ("gate_proj", "up_proj"), ("w1", "w3"))


def _share_inputs(model: nn.Module, converted: dict[str, nn.Module]) -> None:
    """q/k/v_proj (and gate/up_proj) become one GEMM over their concatenated weights, so their input is
    gathered once (SP) and its gradient reduced once, as with packed weights; names and weights unchanged."""
    for module in model.modules():
        for group in _SIBLINGS:
            layers = [getattr(module, leaf, None) for leaf in group]
            if all(
                isinstance(m, ColumnParallelLinear) and m in converted.values() for m in layers
            ) and SharedInputColumns.can_share(layers):  # e.g. q with a bias and k without cannot
                SharedInputColumns(layers).attach()
