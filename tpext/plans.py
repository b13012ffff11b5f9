"""Plans for tpext.parallelize: the styles, and what `auto_plan` reads from a model's module names.

A plan is data: a dict from module-name patterns (fnmatch wildcards over the dense names, e.g.
"model.layers.*.mlp.down_proj"; the first matching pattern wins) to a style:

    "colwise"            nn.Linear -> ColumnParallelLinear (output features sharded); on a norm of a
                         colwise layer's output (a q/k norm over all heads, or with a weight per head):
                         this rank's heads of its weight (tpext.nn.shard_norm_features)
    "rowwise"            nn.Linear -> RowParallelLinear (input features sharded, output reduced)
    "vocab"              nn.Embedding -> VocabParallelEmbedding; on an nn.Linear (lm_head) = "colwise":
                         vocabulary-sharded logits for vocab_parallel_cross_entropy
    "sequence_parallel"  a norm, kept as it is, whose weight gradients are summed over the group when
                         sequence_parallel=True (tpext.nn.sum_param_grads); replicated as it is otherwise
    "replicate"          left as it is, weights replicated on every rank (under SP a module with weights
                         that sees sequence shards must be "sequence_parallel", or its gradients are partial)
    "experts"            a mixture-of-experts module with 3-D expert weights (Hugging Face's gate_up_proj
                         [E, 2I, H] / down_proj [E, H, I]): every expert's intermediate features sharded,
                         its output all-reduced (tpext.nn.shard_experts); the router beside it replicated.
                         Under SP the block holding it runs on the full sequence, gathered at its input,
                         and returns this rank's shard

or a `Style` naming the pieces of a packed or head-structured dim, e.g. a packed QKV weight
`Style("colwise", (Piece(32, 128), Piece(8, 128), Piece(8, 128)))`: every piece is split on its own,
in whole heads, so the local weight holds this rank's q, k and v heads, never a naive chunk.
`plan="auto"` builds such a plan from the Llama / Mistral / Qwen2 names and their GPT-NeoX / Phi / GPT-J
kin, and from mixture-of-experts blocks with 3-D expert weights (Mixtral, Qwen2/3-MoE, OLMoE: the
experts, their router and any shared expert) (`auto_plan`).

A learned activation with scalar parameters between an MLP's column and row layers (Apertus's xIELU)
is replicated with its gradients summed. Layouts the names do not tell (a packed qkv_proj beside anything but an o_proj, weights nested deeper
inside an attention module) are named in an error, never guessed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import nn

from tpext.model_hooks import ATTENTION_INPUTS, LM_HEADS
from tpext.nn._class_swap import probe_copy
from tpext.nn.experts import is_experts
from tpext.sharding import Piece

__all__ = ["Style", "Plan", "STYLES", "auto_plan"]

STYLES = ("colwise", "rowwise", "vocab", "sequence_parallel", "replicate", "experts")


@dataclass(frozen=True)
class Style:
    """A plan entry. `pieces` describe the sharded dim (output features for colwise, input features for
    rowwise) when it is packed or made of heads; None means one piece split near-evenly (an attention
    module's q/k/v_proj, qkv_proj, query_key_value and its o_proj / dense / out_proj: whole heads, from its
    head counts). gather_output (colwise): every rank gets the full output, e.g. full logits from lm_head
    for generation code. sum_grads (replicate): the module's replicated weights see only this rank's heads
    or features (a per-head q_norm / k_norm, a learned activation), so their gradients are summed over
    the group."""

    kind: str
    pieces: Optional[tuple[Piece, ...]] = None
    gather_output: bool = False
    sum_grads: bool = False

    def __post_init__(self) -> None:
        if self.kind not in STYLES:
            raise ValueError(f"tpext.parallelize: unknown style {self.kind!r}; styles are {', '.join(STYLES)}")


Plan = Mapping[str, Union[str, Style]]

# An attention module has input projections (ATTENTION_INPUTS: q/k/v_proj, a packed qkv_proj, or
# query_key_value with each head's q, k and v rows together, GPT-NeoX's) and an output projection.
_ATTN_OUT = ("o_proj", "dense", "out_proj")
_ATTN_PROJ = set(ATTENTION_INPUTS) | set(_ATTN_OUT)
_COLWISE = {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "w1", "w3"}
_ROWWISE = {"down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "w2"}
_EMBED = {"embed_tokens", "embed_in", "wte", "tok_embeddings"}
_HEAD = set(LM_HEADS)
# Small task heads (sequence / token classification, question answering): replicated; under SP they read
# the full sequence, gathered at the decoder stack's output.
_REPLICATED_HEADS = {"score", "qa_outputs", "classifier"}
# Beside a mixture-of-experts module: its router and a shared expert's gate, replicated (they see the
# block's replicated input; the experts' all-reduce sums the gradients that reach them through the experts).
_MOE_REPLICATED = {"gate", "router", "shared_expert_gate"}


def _heads(attn: nn.Module, config) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of an attention module, from its attributes or the config."""

    def pick(*names):
        for obj in (attn, config):
            for n in names:
                v = getattr(obj, n, None)
                if isinstance(v, int):
                    return v
        return None

    hq = pick("num_heads", "num_attention_heads")
    hkv = pick("num_key_value_heads") or (hq // g if hq and (g := pick("num_key_value_groups")) else hq)
    d = pick("head_dim")
    if d is None and hq:
        h = pick("hidden_size")
        d = h // hq if h else None
    if not (hq and hkv and d):
        raise ValueError(f"tpext.parallelize: cannot tell the head counts of attention module "
                         f"{type(attn).__name__}: it needs num_heads (or num_attention_heads), "
                         "num_key_value_heads and head_dim attributes, or a model config with them")
    return hq, hkv, d


def _is_attention(module: nn.Module) -> bool:
    return any(hasattr(module, p) for p in _ATTN_OUT) and any(hasattr(module, p) for p in ATTENTION_INPUTS)


def _attention_pieces(leaf: str, attn: nn.Module, config) -> tuple[Piece, ...]:
    """The head structure of an attention projection's sharded dim."""
    hq, hkv, d = _heads(attn, config)
    if leaf == "qkv_proj" and not hasattr(attn, "o_proj"):
        raise ValueError(f"tpext.parallelize: {type(attn).__name__}.qkv_proj: tpext knows a packed qkv_proj's layout "
                         "([q | k | v] rows) beside an o_proj (Phi3's); other models pack theirs differently "
                         "(CodeGen's interleaves blocks); give it a plan with the pieces of its layout")
    if leaf == "query_key_value" and hkv != hq:
        raise ValueError(f"tpext.parallelize: {type(attn).__name__}.query_key_value with {hq} query and {hkv} kv "
                         "heads: tpext knows its layout (each head's q, k and v rows together, GPT-NeoX's) only "
                         "with as many kv heads as query heads; give it a plan with the pieces of its layout")
    if leaf in _ATTN_OUT:
        return (Piece(hq, d),)
    return {"q_proj": (Piece(hq, d),), "k_proj": (Piece(hkv, d),), "v_proj": (Piece(hkv, d),),
            "qkv_proj": (Piece(hq, d), Piece(hkv, d), Piece(hkv, d)), "query_key_value": (Piece(hq, 3 * d),)}[leaf]


def _parent(modules: dict[str, nn.Module], name: str) -> nn.Module:
    return modules[name.rpartition(".")[0]]


def auto_plan(model: nn.Module, *, sequence_parallel: bool = False,
              vocab_parallel_logits: bool = True) -> dict[str, Style]:
    """The plan for a Llama / Mistral / Qwen2-style model (and GPT-NeoX / Phi / GPT-J names), exact names
    (no wildcards), so it can be printed, edited and passed back. Raises listing every module with weights
    it could not place.
    vocab_parallel_logits: lm_head returns this rank's vocabulary slice (for vocab_parallel_cross_entropy,
    never gathering [tokens, V]); False gathers full logits on every rank (generation code)."""
    config = getattr(model, "config", None)
    plan: dict[str, Style] = {}
    unplaced = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = _parent(modules, name)
        if isinstance(module, nn.Linear) and not _plain_linear(module):
            unplaced.append(f"{name} ({type(module).__name__}: an nn.Linear with a forward of its own)")
        elif is_experts(module):
            plan[name] = Style("experts")
        elif leaf in _MOE_REPLICATED and _is_moe(parent):
            plan[name] = Style("replicate")
        elif not _is_attention(parent) and (attn := _attention_above(name, modules)) is not None:
            # e.g. StableLM's per-head norms in a list: which heads each one serves is the model's code
            unplaced.append(f"{name} ({type(module).__name__} nested inside attention module {attn or 'the model'}: "
                            "tpext cannot tell which heads it serves)")
        elif isinstance(module, nn.Linear) and leaf in _ATTN_PROJ and _is_attention(parent):
            plan[name] = Style("rowwise" if leaf in _ATTN_OUT else "colwise", _attention_pieces(leaf, parent, config))
        elif isinstance(module, nn.Linear) and leaf == "gate_up_proj":
            half = module.out_features // 2
            plan[name] = Style("colwise", (Piece(half), Piece(half)))
        elif isinstance(module, nn.Linear) and leaf in _COLWISE:
            plan[name] = Style("colwise")
        elif isinstance(module, nn.Linear) and leaf in _ROWWISE:
            plan[name] = Style("rowwise")
        elif isinstance(module, nn.Embedding) and leaf in _EMBED:
            plan[name] = Style("vocab")
        elif isinstance(module, nn.Linear) and leaf in _HEAD:
            plan[name] = Style("vocab", gather_output=not vocab_parallel_logits)
        elif isinstance(module, nn.Linear) and leaf in _REPLICATED_HEADS:
            plan[name] = Style("replicate")
        elif _is_norm(leaf, module) and _is_attention(parent) and _per_head(module, parent, config):
            # Inside attention (Qwen3's q_norm / k_norm): it normalises each head, so this rank's heads only.
            plan[name] = Style("replicate", sum_grads=True)
        elif _is_norm(leaf, module) and _is_attention(parent) and (pieces := _norm_pieces(module, parent, config)):
            # Over all heads' features (OLMo2's) or with a weight per head (Cohere's): this rank's heads.
            plan[name] = Style("colwise", pieces)
        elif _is_norm(leaf, module) and _is_attention(parent):
            unplaced.append(f"{name} ({type(module).__name__} with a weight of {getattr(module, 'weight').numel()} "
                            "features: neither one head's, nor all query or key heads')")
        elif _is_norm(leaf, module):
            plan[name] = Style("sequence_parallel" if sequence_parallel else "replicate")
        elif "act" in leaf.lower() and _is_mlp(parent) and _elementwise_with_scalars(module):
            # A learned activation between the MLP's column and row layers (Apertus's xIELU): its scalar
            # parameters act on this rank's features only, so their gradients are summed over the group.
            plan[name] = Style("replicate", sum_grads=True)
        else:
            unplaced.append(f"{name} ({type(module).__name__})")
    if unplaced:
        raise ValueError(
            "tpext.parallelize: plan='auto' knows the Llama / Mistral / Qwen2 names (q/k/v/o_proj, qkv_proj, "
            "gate/up/down_proj, gate_up_proj, embed_tokens, lm_head, score, qa_outputs, classifier, *norm, MLP "
            "activations with scalar parameters, experts with 3-D weights beside their gate / router) and their "
            "GPT-NeoX / Phi / GPT-J kin (query_key_value, dense, out_proj, dense_h_to_4h / dense_4h_to_h, "
            "fc1 / fc2, fc_in / fc_out, embed_in / embed_out), and "
            "could not place: " + ", ".join(unplaced) + ". Pass plan={pattern: style} (styles: " + ", ".join(STYLES) + "), e.g. "
            "start from tpext.auto_plan on a model without them and add entries.")
    return plan


def _per_head(norm: nn.Module, attn: nn.Module, config) -> bool:
    """Whether a norm inside attention normalises each head on its own with one weight of head_dim features
    (Qwen3's), rather than all heads' features together (OLMo2's) or with a weight per head (Cohere's)."""
    weight = getattr(norm, "weight", None)
    return weight is None or weight.numel() == _heads(attn, config)[2]  # one weight shared by all heads


def _norm_pieces(norm: nn.Module, attn: nn.Module, config) -> Optional[tuple[Piece, ...]]:
    """The heads of a norm inside attention whose weight covers all query heads or all kv heads (the
    features of q_proj's or k_proj's output), or None."""
    hq, hkv, d = _heads(attn, config)
    weight = getattr(norm, "weight", None)
    numel = weight.numel() if weight is not None else 0
    return (Piece(hq, d),) if numel == hq * d else (Piece(hkv, d),) if numel == hkv * d else None


def _attention_above(name: str, modules: dict[str, nn.Module]) -> Optional[str]:
    """The name of an attention module that holds `name` deeper than as its direct child, or None."""
    parts = name.split(".")
    for depth in range(len(parts) - 2, -1, -1):
        ancestor = ".".join(parts[:depth])
        if _is_attention(modules[ancestor]):
            return ancestor
    return None


def _is_moe(module: nn.Module) -> bool:
    """Whether `module` is a mixture-of-experts block: it holds an experts module with 3-D weights."""
    return any(is_experts(child) for child in module.children())


def _is_mlp(module: nn.Module) -> bool:
    """Whether `module` holds an MLP's column and row layers, by name."""
    return any(hasattr(module, c) for c in _COLWISE) and any(hasattr(module, r) for r in _ROWWISE)


def _elementwise_with_scalars(module: nn.Module) -> bool:
    """Whether `module` has only scalar parameters and maps each feature on its own (checked on a copy:
    its output on either half of the features is that half of its output on all of them)."""
    if isinstance(module, (nn.Linear, nn.Embedding)) or any(p.numel() != 1 for p in module.parameters()):
        return False
    probe = probe_copy(module)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            full = probe.forward(x)
            return all(torch.allclose(full[:, half], probe.forward(x[:, half]), rtol=1e-6, atol=1e-7)
                       for half in (slice(0, 4), slice(4, 8)))
    except Exception:  # not a function of one tensor of features
        return False


def _is_norm(leaf: str, module: nn.Module) -> bool:
    return "norm" in leaf.lower() or "norm" in type(module).__name__.lower()


def _style_for(name: str, plan: Plan) -> Optional[Style]:
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style if isinstance(style, Style) else Style(style)
    return None


def _plain_linear(module: nn.Linear) -> bool:
    return type(module).forward is nn.Linear.forward
