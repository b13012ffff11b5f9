"""A Hugging Face model's own tensor-parallel plan, read and translated into tpext's styles.

transformers ships a plan with most causal-LM families: `config.base_model_tp_plan` (patterns under the base
model, e.g. "layers.*.self_attn.q_proj": "colwise") and the model class's `_tp_plan` for the head
("lm_head": "colwise_gather_output"). Its style names mean what DTensor layouts they produce; tpext's
layers keep local tensors, so several of them are the same tpext style:

    colwise, local_colwise, colwise_gather_output, colwise_rep, packed_colwise     -> Colwise
    rowwise, local_rowwise, rowwise_split_input, rowwise_rep, packed_rowwise,
    all_reduce                                                                     -> Rowwise
    embedding_rowwise                                                              -> Vocab
    sequence_parallel                                                              -> SequenceParallel under SP
    replicate, local, local_params                                                 -> Replicate
    replicated_with_grad_allreduce                                                 -> Replicate(sum_grads=True)
    moe_tp_experts, local_packed_rowwise on experts                                -> Experts
    ep_router, moe_identity_expert                                                 -> Replicate (the router)
    mla_kv_a_proj (an MLA attention's kv_a_proj_with_mqa)                          -> mla.MLAKvAProj

A colwise layer whose output Hugging Face gathers (colwise_gather_output) and the rowwise_split_input layer
that splits it again are a round trip: tpext keeps the features sharded between them, the same product.
On an output layer (lm_head) any colwise or rowwise style is tpext's Vocab, whose gather follows auto_plan's
vocab_parallel_logits: tpext's loss reads vocabulary-sharded logits. The heads of a packed or head-structured projection (packed_colwise's
parts) come from tpext's reading of the attention module, never from an even split.

Styles tpext has no layer for (embedding_colwise, expert parallelism's grouped_gemm /
ep_*, gather on a module with weights) fall back to the module's name, and say so in the plan's sources.
"""

from __future__ import annotations

from torch import nn

from tpext.nn.experts import is_experts
from tpext.parallel import structure as st
from tpext.parallel.mla import MLAKvAProj
from tpext.parallel.styles import Colwise, Experts, Replicate, Rowwise, SequenceParallel, Style, Vocab
from tpext.sharding import Piece

__all__ = ["model_tp_plan", "translate", "COLWISE", "ROWWISE"]

COLWISE = frozenset({"colwise", "local_colwise", "colwise_gather_output", "colwise_rep", "packed_colwise"})
ROWWISE = frozenset(
    {"rowwise", "local_rowwise", "rowwise_split_input", "rowwise_rep", "packed_rowwise", "all_reduce"}
)
_REPLICATE = frozenset({"replicate", "local", "local_params", "ep_router", "moe_identity_expert"})
_EXPERTS = frozenset({"moe_tp_experts", "local_packed_rowwise"})


def model_tp_plan(model: nn.Module) -> list[tuple[str, str, str]]:
    """[(pattern over the model's module names, Hugging Face style, source)] of the model's own plan: its
    head's (the class's `_tp_plan`) first, then `config.base_model_tp_plan` under the base model's prefix."""
    out = []
    head = getattr(type(model), "_tp_plan", None)  # the instance's holds the base model's too, expanded
    if isinstance(head, dict):
        out += [
            (pattern, style, "model._tp_plan") for pattern, style in head.items() if isinstance(style, str)
        ]
    base = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if isinstance(base, dict):
        prefix = getattr(model, "base_model_prefix", "") or ""
        under = f"{prefix}." if prefix and hasattr(model, prefix) else ""
        out += [
            (under + pattern, style, "config.base_model_tp_plan")
            for pattern, style in base.items()
            if isinstance(style, str)
        ]
    return out


def translate(
    hf_style: str,
    name: str,
    module: nn.Module,
    modules: dict[str, nn.Module],
    by_name: Style | str | None,
    *,
    sequence_parallel: bool,
    vocab_parallel_logits: bool,
) -> tuple[Style | None, str]:
    """(the tpext style for `module` under Hugging Face's `hf_style`, "") or (None, why not). Where tpext's
    name reading placed the module with the same kind of style, its entry (with the heads it read) is used."""
    leaf = name.rpartition(".")[2]
    parent = modules[name.rpartition(".")[0]]
    linear = st.plain_linear(module) or st.is_conv1d(module)
    if hf_style in COLWISE | ROWWISE and isinstance(module, nn.Linear) and leaf in st.LM_HEADS:
        # An output layer, colwise (vocabulary-sharded logits) or rowwise (its input split, the full logits
        # all-reduced: Inkling 2's rowwise_split_input): tpext's vocabulary-parallel head either way, the
        # same product without an all-reduce of [tokens, vocab].
        return Vocab(gather_output=not vocab_parallel_logits), ""
    if hf_style in COLWISE | ROWWISE:
        kind = Colwise if hf_style in COLWISE else Rowwise
        if not linear:
            return None, (
                f"is for linear layers, and this is a {type(module).__name__}"
                if not isinstance(module, nn.Linear)
                else "is for plain linear layers, and this one has a forward of its own"
            )
        if type(by_name) is kind:
            return by_name, ""
        if isinstance(by_name, str) and leaf in st.ATTENTION_PROJECTIONS and st.is_attention(parent):
            return None, f"needs the heads' layout, which tpext cannot read: {by_name}"
        pieces = None
        if leaf in st.ATTENTION_PROJECTIONS and st.is_attention(parent):
            pieces = st.attention_pieces(leaf, parent, getattr(_root(modules), "config", None))
        elif hf_style.startswith("packed_"):  # gate and up (or their kin) packed: two equal parts
            features = st.linear_dims(module)[1 if kind is Colwise else 0]
            pieces = (Piece(features // 2), Piece(features // 2)) if features % 2 == 0 else None
            if pieces is None:
                return None, f"packs two equal parts, and this layer has {features} features"
        return kind(pieces), ""
    if hf_style == "embedding_rowwise":
        return (Vocab(), "") if isinstance(module, nn.Embedding) else (None, "is for an nn.Embedding")
    if hf_style == "sequence_parallel":
        return (SequenceParallel() if sequence_parallel else Replicate()), ""
    if hf_style == "replicated_with_grad_allreduce":
        return Replicate(sum_grads=True), ""
    if hf_style in _REPLICATE:
        # Under SP a norm sees sequence shards: replicated as it is, its weight gradients would be partial.
        return (by_name if isinstance(by_name, SequenceParallel) else Replicate()), ""
    if hf_style == "mla_kv_a_proj":  # the heads' sizes come from tpext's reading of the MLA attention
        if isinstance(by_name, MLAKvAProj):
            return by_name, ""
        return None, "is for an MLA attention's kv_a_proj_with_mqa, and tpext read no MLA attention here"
    if hf_style in _EXPERTS:
        return (Experts(), "") if is_experts(module) else (None, "is for experts with 3-D weights")
    return None, "has no tpext equivalent"


def _root(modules: dict[str, nn.Module]) -> nn.Module:
    return modules[""]
