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

from torch import nn

from tpext.nn.experts import is_experts
from tpext.parallel import structure as st
from tpext.parallel.hf_plan import model_tp_plan, translate
from tpext.parallel.names import plan_from_names
from tpext.parallel.replicated import OWN_PARAMETERS, replicated_blocks, replicated_outside
from tpext.parallel.styles import (
    STYLES,
    Replicate,
    Style,
    as_style,
)

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
    names = plan_from_names(
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
            if (by_name is None or isinstance(by_name, str)) and st.layer_block(name, modules):
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
    outside, unplaced = replicated_outside(unplaced, model, modules, sequence_parallel=sequence_parallel)
    blocks, unplaced = replicated_blocks(unplaced, modules, entries)
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


def _names(names) -> str:
    return "/".join(sorted(names))


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
