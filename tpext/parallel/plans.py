"""Plans: {module-name pattern: style}, and `auto_plan`, which builds one from the model itself.

A plan is plain data: a dict from fnmatch patterns over the dense module names (the first matching pattern
wins) to a style, an object (tpext.parallel.styles) or its shorthand name. `auto_plan` returns a `Plan`, a
dict that also says where each entry came from and prints as a readable table.

auto_plan reads, in this order:
  1. the model's own tensor-parallel plan, where it has one: Hugging Face's `config.base_model_tp_plan`
     (patterns under the base model) and the model class's `_tp_plan` (the head), translated into tpext's
     styles (tpext.parallel.hf_plan). tpext's structure reading still fills in what they leave open (the
     heads of a packed projection), and the styles' checks still run when the model is converted;
  2. module names, for every module the model's plan does not cover (norms, embeddings, position
     embeddings, routers) and for models without one.
Whatever neither places is named in an error, never guessed.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping

import torch
from torch import nn

from tpext.nn.experts import _layouts as _expert_layouts
from tpext.nn.experts import is_experts
from tpext.parallel import mamba, mla
from tpext.parallel import structure as st
from tpext.parallel.hf_plan import model_tp_plan, translate
from tpext.parallel.styles import (
    STYLES,
    Colwise,
    Experts,
    Replicate,
    Rowwise,
    SequenceParallel,
    Style,
    Vocab,
    as_style,
)
from tpext.sharding import Piece

__all__ = ["Plan", "PlanLike", "auto_plan", "style_for", "FROM_NAMES", "REPLICATED"]

PlanLike = Mapping[str, str | Style]
#: The source of a plan entry auto_plan read from the module's name and structure.
FROM_NAMES = "module names"
#: The source of a decoder-layer block auto_plan replicates whole (what it holds cannot be sharded).
REPLICATED = "replicated"


class Plan(dict):
    """A plan {pattern: style} (a dict), with `sources` {pattern: where the entry came from}. Prints one
    entry a line with its source; edit it as a dict and pass it to tpext.parallelize."""

    def __init__(self, entries=(), sources: Mapping[str, str] | None = None):
        super().__init__(entries)
        self.sources: dict[str, str] = dict(sources or {})

    def __repr__(self) -> str:
        if not self:
            return "Plan({})"
        width = max(len(repr(k)) for k in self)
        lines = [
            f"    {k!r:<{width}}: {v!r},  # from {self.sources[k]}"
            if k in self.sources
            else f"    {k!r:<{width}}: {v!r},"
            for k, v in self.items()
        ]
        return "Plan({\n" + "\n".join(lines) + "\n})"

    __str__ = __repr__


def style_for(name: str, plan: PlanLike) -> Style | None:
    """The style of the first pattern in `plan` that matches `name`, or None."""
    for pattern, entry in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return as_style(entry)
    return None


def auto_plan(
    model: nn.Module,
    *,
    sequence_parallel: bool = False,
    vocab_parallel_logits: bool = True,
    use_model_plan: bool = True,
    tp_size: int | None = None,
) -> Plan:
    """The plan for `model`: its own tensor-parallel plan first, then its module names (see the module's
    docstring), with exact names (no wildcards), so it can be printed, edited and passed back.

    A block of a decoder layer (a child of one element of the model's layer list, beside its attention and
    MLP: a Mamba mixer tp cannot split, a linear-attention or recurrent block) that holds a module neither
    source places is replicated whole: `Replicate(full_sequence=True)`, nothing under it planned, its source
    "replicated: <what it holds>". It computes the dense block on every rank (weights and compute repeated);
    under SP it runs on the full sequence. Outside the blocks, where the model has a decoder stack beside its
    word embedding: a module outside the decoder layers that holds what neither source places (a vision or
    audio tower, a projector, a per-layer embedding) is replicated whole, `Replicate()`, nothing under it
    planned (under SP it must run before the sequence is split, checked at forward); a decoder layer's own
    parameters of at most 1-D (residual scales) are replicated with `Replicate()` on the layer (under SP
    tpext.parallelize sums their gradients over the group). Their source is "replicated: <why>".
    tpext.parallelize warns once listing every replicated block and module.

    Args:
        model: the dense model.
        sequence_parallel: norms get SequenceParallel (else Replicate).
        vocab_parallel_logits: the output layer returns this rank's vocabulary slice (for
            vocab_parallel_cross_entropy, never gathering [tokens, V]); False gathers full logits on every
            rank (generation code).
        use_model_plan: read the model's own plan (config.base_model_tp_plan, the class's _tp_plan); False
            reads module names only.
        tp_size: the tensor-parallel size, where known (parallelize passes it): a Mamba-2 mixer whose heads
            and groups it does not divide is replicated (tpext.parallel.mamba); None shards a mixer of more
            than one group (its size checked when it is converted).

    Returns:
        A Plan: {module name: style}, with `plan.sources[name]` saying where each entry came from.

    Raises:
        ValueError: listing every module with weights that neither source places and that cannot be
            replicated (inside a block whose layer has column- or row-parallel layers of its own; a layer's
            own weight of more than 1-D; under SP the own parameters of a module that holds the decoder
            stack; outside the decoder layers of a model with no decoder stack beside its word embedding), or naming a model-plan entry tpext cannot honour outside such a block.

    Example:
        >>> plan = tpext.auto_plan(model)
        >>> print(plan)   # 'model.layers.0.self_attn.q_proj': Colwise(...),  # from config.base_model_tp_plan
    """
    # A model whose forward computes its loss itself (BART's decoder, BERT-style heads), not through Hugging
    # Face's settable loss_function (which tpext replaces with a vocab-parallel one), would read [*, V/R]
    # logits as [*, V]: its output layer gathers the full logits instead.
    vocab_parallel_logits = vocab_parallel_logits and _loss_through_loss_function(model)
    names = _plan_from_names(
        model,
        sequence_parallel=sequence_parallel,
        vocab_parallel_logits=vocab_parallel_logits,
        tp_size=tp_size,
    )
    entries, sources = {}, {}
    model_plan = model_tp_plan(model) if use_model_plan else []
    modules = dict(model.named_modules())
    unplaced = []
    for name, module in modules.items():
        if not name or (not any(True for _ in module.parameters(recurse=False)) and not is_experts(module)):
            continue
        found = next(
            (
                (pattern, hf_style, source)
                for pattern, hf_style, source in model_plan
                if fnmatch.fnmatchcase(name, pattern)
            ),
            None,
        )
        by_name = names.get(name)
        if found is not None:
            pattern, hf_style, source = found
            style, why = translate(
                hf_style,
                name,
                module,
                modules,
                by_name,
                sequence_parallel=sequence_parallel,
                vocab_parallel_logits=vocab_parallel_logits,
            )
            if style is not None:
                entries[name], sources[name] = style, f"{source} ({pattern!r}: {hf_style!r})"
                continue
            if (by_name is None or isinstance(by_name, str)) and _layer_block(name, modules):
                # inside a decoder layer's block: the block is replicated (below), or refused with this reason
                unplaced.append((name, f"{type(module).__name__}: {source}'s {hf_style!r} {why}"))
                continue
            if by_name is None or isinstance(by_name, str):
                raise ValueError(
                    f"tpext.parallelize: {name} ({type(module).__name__}): the model's plan "
                    f"({source}, {pattern!r}) gives it {hf_style!r}, which {why}; and its name "
                    "places it nowhere either. Pass plan={pattern: style} for it (tpext.auto_plan "
                    "with use_model_plan=False shows the rest)"
                )
            entries[name], sources[name] = by_name, f"{FROM_NAMES} ({source}'s {hf_style!r} {why})"
        elif isinstance(by_name, Style):
            entries[name], sources[name] = by_name, FROM_NAMES
        else:
            unplaced.append((name, by_name or type(module).__name__))
    # A decoder layer's block (its mixer beside attention and the MLP) that holds what cannot be placed is
    # replicated whole; anything else that cannot be placed is an error.
    outside, unplaced = _replicated_outside(unplaced, model, modules, sequence_parallel=sequence_parallel)
    blocks, unplaced = _replicated_blocks(unplaced, modules, entries)
    for block, reason in blocks.items():
        for name in [n for n in entries if n.startswith(block + ".")]:
            del entries[name], sources[name]
        entries[block], sources[block] = Replicate(full_sequence=True), f"{REPLICATED}: {reason}"
    for region, reason in outside.items():
        if not reason.startswith(OWN_PARAMETERS):  # a whole module: nothing under it is planned
            for name in [n for n in entries if n.startswith(region + ".")]:
                del entries[name], sources[name]
        entries[region], sources[region] = Replicate(), f"{REPLICATED}: {reason}"
    entries = {name: entries[name] for name in modules if name in entries}  # module order
    if unplaced:
        raise ValueError(
            "tpext.parallelize: plan='auto' reads the model's own plan (config.base_model_tp_plan, the class's "
            "_tp_plan) and these names: attention "
            + _names(st.ATTENTION_PROJECTIONS)
            + "; MLP columns "
            + _names(st.MLP_COLUMNS)
            + ", rows "
            + _names(st.MLP_ROWS)
            + "; embeddings "
            + _names(st.EMBEDDINGS)
            + ", positions "
            + _names(st.POSITION_EMBEDDINGS)
            + "; heads "
            + _names(st.LM_HEADS)
            + ", replicated "
            + _names(st.REPLICATED_HEADS)
            + "; *norm; experts with 3-D weights beside "
            + _names(st.MOE_REPLICATED)
            + "; MLP activations with scalar parameters; a decoder layer's block (beside its attention "
            "and MLP) that holds what none of these place is replicated whole. It could not place: "
            + ", ".join(f"{name} ({why})" for name, why in unplaced)
            + ". Pass plan={pattern: style} (styles: "
            + ", ".join(STYLES)
            + ", or a tpext.Style), e.g. start from tpext.auto_plan on a model without them and add entries."
        )
    return Plan(entries, sources)


def _layer_block(name: str, modules: dict[str, nn.Module]) -> str:
    """The decoder-layer block that holds `name` (or is it): a child of one element of the model's outermost
    layer list (model.layers.0.mamba for model.layers.0.mamba.conv1d); "" for a module outside one, and for
    a layer itself."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if isinstance(modules[".".join(parts[:i])], nn.ModuleList) and parts[i].isdigit():
            return ".".join(parts[: i + 2])
    return ""


def _replicated_blocks(
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
        block = _layer_block(name, modules)
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
#: planned as they are): a decoder layer's own scales, the base model's own parameters.
OWN_PARAMETERS = "its own parameters"
#: The start of the reason of a decoder layer's own replicated parameters (summed over the group under SP).
LAYER_PARAMETERS = f"{OWN_PARAMETERS} (a decoder layer"


def _decoder_stack(model: nn.Module, modules: dict[str, nn.Module]) -> str:
    """The name of the language model's layer list: the nn.ModuleList beside the model's word embedding
    (model.language_model.layers beside model.language_model.embed_tokens; of several, the one with
    attention modules), "" when there is none."""
    embedding = _model_layer(model, "get_input_embeddings")
    name = next((n for n, m in modules.items() if embedding is not None and m is embedding), "")
    if not name:
        return ""
    holder = name.rpartition(".")[0]
    prefix = f"{holder}." if holder else ""
    lists = [
        n
        for n, m in modules.items()
        if isinstance(m, nn.ModuleList) and n.startswith(prefix) and "." not in n[len(prefix) :] and len(m)
    ]
    if len(lists) > 1:  # the decoder layers are the list with attention (not a list of towers beside it)
        lists = [n for n in lists if any(st.is_attention(m) for m in modules[n].modules())]
    return lists[0] if len(lists) == 1 else ""


def _replicated_outside(
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
    stack = _decoder_stack(model, modules)
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
            rest.append((name, why))  # inside a layer: its block (_replicated_blocks)
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


def _names(names) -> str:
    return "/".join(sorted(names))


def _plan_from_names(
    model: nn.Module, *, sequence_parallel: bool, vocab_parallel_logits: bool, tp_size: int | None = None
) -> dict[str, Style | str]:
    """{name: style} for every module with weights that its name and structure place, {name: why not} for
    the others (a str)."""
    config = getattr(model, "config", None)
    plan: dict[str, Style | str] = {}
    modules = dict(model.named_modules())
    latent_attention = mla.plan_entries(modules, config)  # MLA: heads of its own sizes (tpext.parallel.mla)
    mixers = mamba.plan_entries(modules, tp_size)  # Mamba-2 mixers, by heads (tpext.parallel.mamba)
    # The model's own word embedding and output layer (Hugging Face's get_input_embeddings /
    # get_output_embeddings), whatever their names; an embedding tied to the output layer is the vocabulary's.
    embedding, output = (
        _model_layer(model, "get_input_embeddings"),
        _model_layer(model, "get_output_embeddings"),
    )
    tied = getattr(output, "weight", None)
    embeddings_holder = _embeddings_holder(model, embedding, modules)
    first_attention = next((i for i, m in enumerate(modules.values()) if st.is_attention(m)), None)
    reshaping = next(
        (type(m).__name__ for m in modules.values() if type(m).__name__ in st.SEQUENCE_FROM_INPUT), ""
    )
    order = {n: i for i, n in enumerate(modules)}
    # Modules tpext cannot run under SP, though it can without: replicating the block that holds them would
    # not help (the block would still see sequence shards, or the module its layer's sharded features).
    sp_refusals: list[str] = []
    for name, module in modules.items():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent_name = name.rpartition(".")[0]
        parent = modules[parent_name]
        linear = st.plain_linear(module) or st.is_conv1d(module)
        try:
            if name in latent_attention:
                plan[name] = latent_attention[name]
            elif name in mixers:
                plan[name] = mixers[name]
            elif is_experts(module):
                plan[name] = _experts_style(module)
            elif _in_router(name, modules):
                # A router beside experts (and all it holds: Ernie's gate.moe_statics, HunYuan's gate.wg) sees
                # every token and all hidden features: the same on every rank, whatever its own forward does.
                plan[name] = Replicate()
            elif (
                st.is_attention(module)
                and (per_head := st.per_head_params(module, config))
                and len(per_head) == len(list(module.parameters(recurse=False)))
            ):
                # Its own parameters hold one value per head (GPT-OSS's sinks): parallelize slices them with the
                # heads its projections keep (left whole when the projections are not sharded).
                plan[name] = Replicate()
            elif st.is_attention(module) and all(
                n in st.OUTPUT_BIASES for n, _ in module.named_parameters(recurse=False)
            ):
                # Added to the output projection's reduced output by the layer: the same on every rank. Under SP it
                # meets sequence shards, and its gradients would need summing over the group, which would take
                # converting the attention module itself.
                plan[name] = (
                    f"{type(module).__name__} with an output bias of its own, added to sequence shards under "
                    "sequence parallelism (its gradients partial): parallelize without sequence_parallel"
                    if sequence_parallel
                    else Replicate()
                )
                sp_refusals += [name] if sequence_parallel else []
            elif isinstance(module, nn.Linear) and not linear:
                plan[name] = f"{type(module).__name__}: an nn.Linear with a forward of its own"
            elif not st.is_attention(parent) and (attn := st.attention_above(name, modules)) is not None:
                # e.g. StableLM's per-head norms in a list: which heads each one serves is the model's code
                plan[name] = (
                    f"{type(module).__name__} nested inside attention module {attn or 'the model'}: "
                    "tpext cannot tell which heads it serves"
                )
            elif linear and (attn := st.split_attention_output(name, modules)) is not None:
                # BERT's attention.output.dense: its input features are the heads of attention.self beside it
                plan[name] = Rowwise(_attention_pieces(module, "dense", attn, config))
            elif linear and (part := st.split_mlp_part(name, modules)) is not None:
                plan[name] = Colwise() if part == st.SPLIT_MLP[0] else Rowwise()
            elif st.is_self_attention(parent) and getattr(config, "attention_type", None) == "block_sparse":
                plan[name] = (
                    f"{type(module).__name__} in {type(parent).__name__}: block-sparse attention (BigBird's), "
                    "which the model rebuilds from its config in forward; tpext shards full attention: build it "
                    "with attention_type='original_full'"
                )
            elif linear and leaf in st.ATTENTION_PROJECTIONS and type(parent).__name__ in st.WIDTH_FROM_INPUT:
                plan[name] = (
                    f"{type(module).__name__} in {type(parent).__name__}, which reshapes its output to its "
                    "input's width rather than its heads': tpext cannot shard its heads; plan its MLPs only"
                )
            elif (
                sequence_parallel
                and linear
                and leaf in st.ATTENTION_INPUTS
                and st.is_attention(parent)
                and st.separate_inputs(parent)
            ):
                plan[name] = (
                    f"{type(module).__name__} in {type(parent).__name__}, whose forward takes query, key and value "
                    "as separate activations: under sequence parallelism tpext gathers only the first; "
                    "parallelize without sequence_parallel"
                )
                sp_refusals.append(name)
            elif linear and leaf in st.ATTENTION_PROJECTIONS and st.is_attention(parent):
                kind = Rowwise if leaf in st.ATTENTION_OUTPUTS else Colwise
                plan[name] = kind(_attention_pieces(module, leaf, parent, config))
            elif linear and (part := st.sequential_mlp_part(name, modules)) is not None:
                plan[name] = Colwise() if part == "column" else Rowwise()
            elif linear and leaf in st.PACKED_MLP_COLUMNS:
                half = st.linear_dims(module)[1] // 2
                plan[name] = Colwise((Piece(half), Piece(half)))
            elif linear and leaf in st.MLP_COLUMNS and (why := _packed_column(module, parent)):
                plan[name] = why
            elif linear and leaf in st.MLP_COLUMNS:
                plan[name] = Colwise()
            elif linear and leaf in st.MLP_ROWS:
                plan[name] = Rowwise()
            elif isinstance(module, nn.Embedding) and (
                leaf in st.EMBEDDINGS or module is embedding or (tied is not None and module.weight is tied)
            ):
                plan[name] = Vocab()
            elif isinstance(module, nn.Embedding) and leaf in st.POSITION_EMBEDDINGS:
                plan[name] = (
                    Replicate()
                )  # runs before the decoder stack, on the whole sequence, the same on every rank
            elif (
                sequence_parallel
                and module is output
                and (why := _output_under_sp(module, order[name], first_attention, config, reshaping))
                is not None
            ):
                plan[name] = why
            elif isinstance(module, nn.Linear) and (leaf in st.LM_HEADS or module is output):
                # Vocabulary-sharded logits only where tpext's loss finds the layer (a top-level lm_head); a
                # nested one (BERT's cls.predictions.decoder) gathers them for the model's own loss.
                plan[name] = Vocab(gather_output=not (vocab_parallel_logits and name in st.LM_HEADS))
            elif linear and leaf == "dense" and parent_name.rpartition(".")[2] in st.HEAD_TRANSFORMS:
                # Between the last layer and the output layer, on the stack's output: under SP its sequence shards
                plan[name] = Replicate(sum_grads=sequence_parallel)
            elif (
                output is not None
                and any(m is output for m in module.modules())
                and all(
                    p.dim() == 1 and p.numel() == output.out_features
                    for p in module.parameters(recurse=False)
                )
            ):
                # The output layer's holder, with a vocabulary bias of its own (BERT's cls.predictions.bias, which
                # Hugging Face ties to decoder.bias): tied, parallelize gives it the decoder's local bias.
                plan[name] = Replicate()
            elif any(part in st.ADAPTER_HOLDERS for part in name.split(".")[:-1]):
                plan[name] = (
                    f"{type(module).__name__} in a per-language adapter, which picks its tokens by the full "
                    "sequence's language ids: under sequence parallelism each rank holds a shard; parallelize "
                    "without sequence_parallel"
                    if sequence_parallel
                    else Replicate()
                )
                sp_refusals += [name] if sequence_parallel else []
            elif st.is_pooler(name, module):
                # BERT's pooler: the first token of the stack's output, which under SP is this rank's shard's
                plan[name] = (
                    f"{type(module).__name__}, a pooler of the first token of the stack's output, which under "
                    "sequence parallelism is each rank's own shard: parallelize without sequence_parallel, or "
                    "build the model without its pooler (add_pooling_layer=False)"
                    if sequence_parallel
                    else Replicate()
                )
            elif (linear and leaf in st.EMBEDDING_PROJECTIONS) or (
                embeddings_holder and parent_name == embeddings_holder and not st.is_norm(leaf, module)
            ):
                # Beside the word embedding in a module that holds no attention (BERT's embeddings: RoCBert's
                # pronunciation and shape embeddings and their projection), or projecting the embeddings to the
                # hidden size: it runs before the first layer, on the whole sequence, the same on every rank.
                plan[name] = Replicate()
            elif isinstance(module, nn.Linear) and leaf in st.REPLICATED_HEADS:
                plan[name] = Replicate()
            elif (
                st.is_norm(leaf, module)
                and st.is_attention(parent)
                and st.per_head_norm(module, parent, config)
            ):
                # Inside attention (Qwen3's q_norm / k_norm): it normalises each head, so this rank's heads only.
                plan[name] = Replicate(sum_grads=True)
            elif (
                st.is_norm(leaf, module)
                and st.is_attention(parent)
                and (pieces := st.norm_pieces(module, parent, config))
            ):
                # Over all heads' features (OLMo2's) or with a weight per head (Cohere's): this rank's heads.
                plan[name] = Colwise(pieces)
            elif st.is_norm(leaf, module) and st.is_attention(parent):
                plan[name] = (
                    f"{type(module).__name__} with a weight of {module.weight.numel()} "
                    "features: neither one head's, nor all query or key heads'"
                )
            elif (
                st.is_norm(leaf, module) and st.is_mlp(parent) and (features := _mlp_features(module, parent))
            ):
                # Between an MLP's column and row layers (BitNet's ffn_sub_norm): over this rank's intermediate
                # features, its statistic reduced over the group (tpext.nn.shard_norm_features).
                plan[name] = Colwise((Piece(features),))
            elif st.is_norm(leaf, module):
                plan[name] = SequenceParallel() if sequence_parallel else Replicate()
            elif "act" in leaf.lower() and st.is_mlp(parent) and st.elementwise_with_scalars(module):
                # A learned activation between the MLP's column and row layers (Apertus's xIELU): its scalar
                # parameters act on this rank's features only, so their gradients are summed over the group.
                plan[name] = Replicate(sum_grads=True)
        except ValueError as exc:
            # A module tpext cannot shard (a layout it does not know, head counts it cannot read): inside a
            # decoder layer's block it is unplaced (auto_plan replicates the block where that is sound),
            # elsewhere an error naming it.
            why = str(exc).removeprefix("tpext.parallelize: ").removeprefix("tpext: ")
            if not _layer_block(name, modules):
                raise ValueError(f"tpext.parallelize: {name} ({type(module).__name__}): {why}") from exc
            plan[name] = f"{type(module).__name__}: {why}"
    if refused := [n for n in sp_refusals if _layer_block(n, modules)]:
        raise ValueError(
            "tpext.parallelize: under sequence parallelism tpext cannot run "
            + "; ".join(f"{n} ({plan[n]})" for n in refused[:3])
            + (f"; and {len(refused) - 3} more" if len(refused) > 3 else "")
        )
    return plan


def _packed_column(column: nn.Module, mlp: nn.Module) -> str:
    """Why an MLP's column layer cannot be split evenly: its output features are not the input features of
    the row layer beside it (Moshi's fc1 packs gate and up, in a layout the names do not tell); "" otherwise."""
    out = st.linear_dims(column)[1]
    for leaf in st.MLP_ROWS:
        dims = st.linear_dims(getattr(mlp, leaf, None)) if hasattr(mlp, leaf) else None
        if dims is not None and dims[0] != out:
            return (
                f"{type(column).__name__} with {out} output features beside {leaf} taking {dims[0]}: "
                "a packed layout the names do not tell"
            )
    return ""


def _experts_style(experts: nn.Module) -> Experts:
    """Experts(), for experts whose weights tpext.nn.shard_experts slices: checked here, where the block that
    holds them can still be replicated instead.

    Raises:
        ValueError: weights not in the layout Hugging Face's experts declare, or parameters or buffers
            besides them (InklingSharedExperts' separate gate_proj), which shard_experts does not slice.
    """
    layouts = _expert_layouts(experts, 1, 0)
    others = sorted(n for n, _ in experts.named_parameters() if n not in layouts and n != "down_proj_bias")
    others += sorted(n for n, _ in experts.named_buffers())
    if others or getattr(experts, "has_post_expert_norm", False):
        raise ValueError(
            f"tpext: cannot shard {type(experts).__name__}: besides {sorted(layouts)} it has "
            f"{others or 'a norm after each expert'}, which tpext does not slice"
        )
    return Experts()


def _attention_pieces(module: nn.Module, leaf: str, attn: nn.Module, config) -> tuple[Piece, ...]:
    """st.attention_pieces for the projection `module` (`leaf` of attention `attn`), checked against its
    sharded dim (output features of an input projection, input features of an output projection).

    Raises:
        ValueError: st.attention_pieces's, or pieces that do not add up to the sharded dim (head counts the
            config tells differently from the module's own layout).
    """
    pieces = st.attention_pieces(leaf, attn, config)
    dims = st.linear_dims(module)
    if dims is not None:
        features = dims[0] if leaf in st.ATTENTION_OUTPUTS else dims[1]
        total = sum(p.size for p in pieces)
        if total != features:
            hq, hkv, d = st.heads(attn, config)
            raise ValueError(
                f"tpext.parallelize: {type(attn).__name__}.{leaf} has {features} "
                f"{'input' if leaf in st.ATTENTION_OUTPUTS else 'output'} features, but the head counts "
                f"tpext reads ({hq} query, {hkv} kv heads of {d}) make {pieces} = {total}: a head layout "
                "tpext cannot tell; give it a plan with the pieces of its layout"
            )
    return pieces


def _output_under_sp(
    output: nn.Module, index: int, first_attention: int | None, config, reshaping: str
) -> str | None:
    """Why the model's output layer cannot be the sequence-parallel head (it gathers the stack's output
    shards), or None: registered before the layers (tpext takes such modules to run before them), fed
    something narrower or wider than the layers' output (a head transform to the embedding width), or the
    model reshapes the stack's output to its input's shape (`reshaping`: its class)."""
    hidden = getattr(config, "hidden_size", None)
    if reshaping:
        where = f"fed the stack's output after {reshaping} views it to the input's shape (a shard under SP)"
    elif first_attention is not None and index < first_attention:
        where = "registered before the layers (tpext takes such modules to run before them, on the whole sequence)"
    elif isinstance(hidden, int) and isinstance(output, nn.Linear) and output.in_features != hidden:
        where = (
            f"fed {output.in_features} features where the layers output {hidden}, so not the stack's output "
            "shards as they are"
        )
    else:
        return None
    return (
        f"{type(output).__name__}, the output layer, {where}: under sequence parallelism it cannot gather the "
        "sequence; parallelize without sequence_parallel"
    )


def _model_layer(model: nn.Module, getter: str) -> nn.Module | None:
    """The module a Hugging Face model's get_input_embeddings / get_output_embeddings returns, or None."""
    try:
        layer = getattr(model, getter)()
    except Exception:  # noqa: BLE001 - not a Hugging Face model, or one whose getter is not implemented
        return None
    return layer if isinstance(layer, nn.Module) else None


def _embeddings_holder(model: nn.Module, embedding: nn.Module | None, modules: dict[str, nn.Module]) -> str:
    """The name of the module that holds the word embedding when it holds no attention (BERT's embeddings,
    which runs before the first layer as a whole), else ""."""
    name = next((n for n, m in modules.items() if embedding is not None and m is embedding), "")
    holder = name.rpartition(".")[0]
    if not name or not holder or any(st.is_attention(m) for m in modules[holder].modules()):
        return ""
    return holder


def _in_router(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether `name` is a router beside experts (st.MOE_REPLICATED in an MoE block) or inside one."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        if parts[i - 1] in st.MOE_REPLICATED and st.is_moe(modules[".".join(parts[: i - 1])]):
            return True
    return False


def _mlp_features(norm: nn.Module, mlp: nn.Module) -> int:
    """The intermediate feature count of `mlp` when `norm`'s weight covers exactly those (0 otherwise)."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return 0
    for leaf in st.MLP_COLUMNS - st.PACKED_MLP_COLUMNS:
        column = getattr(mlp, leaf, None)
        if isinstance(column, nn.Linear) and column.out_features == weight.numel():
            return weight.numel()
    return 0


def _loss_through_loss_function(model: nn.Module) -> bool:
    """Whether `model`'s forward takes no labels, or computes its loss through `self.loss_function` without
    reading the vocabulary size from the logits."""
    forward = type(model).forward
    try:
        params = inspect.signature(forward).parameters
        source = inspect.getsource(forward)
    except (TypeError, OSError, ValueError):
        return False
    # A forward that reads the vocabulary from the logits' width (Inkling's vocab_size=logits.shape[-1], and
    # its slice to the unpadded vocabulary) would take this rank's slice for the whole.
    return "labels" not in params or ("self.loss_function" in source and "logits.shape[-1]" not in source)
