"""Reading a model's structure: which modules are attention, MLPs, norms, mixture-of-experts blocks, what their
head counts are, and how a packed or head-structured projection lays out its features.

Pure functions of the modules (and the model's config); no sharding, no plan. The styles and auto_plan use
them; nothing here imports them back.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from tpext.nn.class_swap import probe_copy, probe_disagrees
from tpext.nn.experts import is_experts
from tpext.sharding import Piece

__all__ = [
    "ATTENTION_INPUTS",
    "ATTENTION_OUTPUTS",
    "ATTENTION_PROJECTIONS",
    "MLP_COLUMNS",
    "MLP_ROWS",
    "EMBEDDINGS",
    "POSITION_EMBEDDINGS",
    "LM_HEADS",
    "REPLICATED_HEADS",
    "MOE_REPLICATED",
    "heads",
    "is_attention",
    "attention_pieces",
    "norm_pieces",
    "per_head_norm",
    "per_head_params",
    "attention_above",
    "is_moe",
    "is_mlp",
    "is_norm",
    "is_conv1d",
    "plain_linear",
    "elementwise_with_scalars",
    "linear_dims",
    "alibi_argument",
    "grouped_qkv",
    "interleaved_blocks",
]

# The input projections of an attention module, by name: separate q/k/v, a packed qkv_proj, query_key_value
# (GPT-NeoX's: each head's q, k and v rows together; BLOOM's the same), GPT-2's c_attn Conv1D ([q | k | v]),
# MPT's Wqkv ([q | k | v]).
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
# Its output projection (GPT-2's c_proj, which is also the MLP's row layer: told apart by the parent).
ATTENTION_OUTPUTS = ("o_proj", "dense", "out_proj", "c_proj")
ATTENTION_PROJECTIONS = frozenset(ATTENTION_INPUTS) | frozenset(ATTENTION_OUTPUTS)
MLP_COLUMNS = frozenset(
    {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "fc_in", "dense_h_to_4h", "w1", "w3"}
)
MLP_ROWS = frozenset({"down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "w2"})
EMBEDDINGS = frozenset({"embed_tokens", "embed_in", "wte", "tok_embeddings", "word_embeddings"})
# Learned absolute positions: replicated (they run before the first decoder layer, on the whole sequence).
POSITION_EMBEDDINGS = frozenset({"wpe", "embed_positions", "position_embeddings"})
# A language model's output layer, by name (embed_out: older GPT-NeoX).
LM_HEADS = ("lm_head", "embed_out", "output")
# Small task heads (sequence / token classification, question answering): replicated; under SP they read
# the full sequence, gathered at the decoder stack's output.
REPLICATED_HEADS = frozenset({"score", "qa_outputs", "classifier"})
# Beside a mixture-of-experts module: its router and a shared expert's gate, replicated (they see the
# block's replicated input; the experts' all-reduce sums the gradients that reach them through the experts).
MOE_REPLICATED = frozenset({"gate", "router", "shared_expert_gate"})
# An attention module's own parameters with one value per query head, sliced with its heads.
PER_HEAD_PARAMS = frozenset({"sinks", "gate_bias"})  # GPT-OSS's sinks, Beam's output-gate bias


def heads(attn: nn.Module, config) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of an attention module, from its attributes or the config.

    Raises:
        ValueError: neither the module nor the config tells them.
    """

    # The module's own config first (a composite model's text attention holds its text config), then the
    # model's, then its text_config (Gemma 3's, GOT-OCR2's: head counts live there).
    sources = (attn, getattr(attn, "config", None), config, getattr(config, "text_config", None))

    def pick(*names):
        for obj in sources:
            for n in names:
                v = getattr(obj, n, None)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None

    hq = pick("num_heads", "num_attention_heads", "n_head", "n_heads")
    hkv = pick("num_key_value_heads", "kv_heads", "num_kv_heads") or (
        hq // g if hq and (g := pick("num_key_value_groups")) else hq
    )
    d = pick("head_dim")
    if d is None and hq:
        h = pick("hidden_size", "embed_dim", "n_embd")
        d = h // hq if h else None
    if not (hq and hkv and d):
        raise ValueError(
            f"tpext.parallelize: cannot tell the head counts of attention module "
            f"{type(attn).__name__}: it needs num_heads (or num_attention_heads), "
            "num_key_value_heads and head_dim attributes, or a model config with them"
        )
    return hq, hkv, d


def is_attention(module: nn.Module) -> bool:
    """Whether `module` holds an attention module's input and output projections, by name."""
    return (
        any(hasattr(module, p) for p in ATTENTION_OUTPUTS)
        and any(hasattr(module, p) for p in ATTENTION_INPUTS)
        and not any(hasattr(module, c) for c in ("c_fc",))
    )  # GPT-2's MLP has a c_proj too, and no c_attn


def attention_pieces(leaf: str, attn: nn.Module, config) -> tuple[Piece, ...]:
    """The head structure of an attention projection's sharded dim (output features of an input projection,
    input features of the output projection).

    Raises:
        ValueError: the layout is not one the names tell (a packed qkv_proj beside anything but an o_proj,
            query_key_value with fewer kv than query heads).
    """
    hq, hkv, d = heads(attn, config)
    blocks = interleaved_blocks(attn)
    if blocks and leaf in ("qkv_proj", *ATTENTION_OUTPUTS):
        # CodeGen's: qkv_proj is `blocks` blocks of [q | v | k], each with hq / blocks heads; its heads are
        # numbered block-major, so out_proj's input is `blocks` runs of hq / blocks heads. Each rank takes
        # its share of every block, which keeps the model's own reshape into `blocks` blocks right.
        per_block = Piece(hq // blocks, d)
        return (per_block,) * (3 * blocks if leaf == "qkv_proj" else blocks)
    if leaf == "qkv_proj" and not hasattr(attn, "o_proj"):
        raise ValueError(
            f"tpext.parallelize: {type(attn).__name__}.qkv_proj: tpext knows a packed qkv_proj's layout "
            "([q | k | v] rows) beside an o_proj (Phi3's); other models pack theirs differently "
            "(CodeGen's interleaves blocks); give it a plan with the pieces of its layout"
        )
    if leaf == "query_key_value" and getattr(attn, "new_decoder_architecture", False) is True:
        # Falcon's new decoder: per kv head, its group's query heads, then its k and v
        return (Piece(hkv, (hq // hkv + 2) * d),)
    if leaf == "query_key_value" and getattr(attn, "multi_query", False) is True:
        return (Piece(hq, d), Piece(1, d), Piece(1, d))  # Falcon's multi-query: [q | k | v], one kv head
    if leaf == "query_key_value" and hkv != hq:
        raise ValueError(
            f"tpext.parallelize: {type(attn).__name__}.query_key_value with {hq} query and {hkv} kv "
            "heads: tpext knows its layout (each head's q, k and v rows together, GPT-NeoX's) only "
            "with as many kv heads as query heads; give it a plan with the pieces of its layout"
        )
    if leaf in ATTENTION_OUTPUTS:
        return (Piece(hq, d),)
    return {
        "q_proj": (Piece(hq, d),),
        "k_proj": (Piece(hkv, d),),
        "v_proj": (Piece(hkv, d),),
        "qkv_proj": (Piece(hq, d), Piece(hkv, d), Piece(hkv, d)),
        # GPT-2's [q | k | v]; GPT-BigCode's the same with one kv head (multi-query), or each head's q, k
        # and v together without it (its multi_query=False)
        "c_attn": (
            (Piece(hq, 3 * d),)
            if getattr(attn, "multi_query", None) is False
            else (Piece(hq, d), Piece(hkv, d), Piece(hkv, d))
        ),
        "Wqkv": (Piece(hq, d), Piece(hkv, d), Piece(hkv, d)),
        "query_key_value": (Piece(hq, 3 * d),),
    }[leaf]


def interleaved_blocks(attn: nn.Module) -> int:
    """How many [q | v | k] blocks an attention module's qkv_proj interleaves (CodeGen's: 4, fixed in its code),
    or 0."""
    return 4 if type(attn).__name__.startswith("CodeGen") and hasattr(attn, "qkv_proj") else 0


def grouped_qkv(attn: nn.Module) -> bool:
    """Whether an attention module packs each kv head with its group of query heads (Falcon's new decoder):
    its kv heads cannot be replicated over ranks, each group must stay whole."""
    return hasattr(attn, "query_key_value") and getattr(attn, "new_decoder_architecture", False) is True


def alibi_argument(attn: nn.Module) -> str | None:
    """The argument through which an attention module's forward takes the model's per-head position biases
    for all heads: BLOOM's `alibi` ([batch * heads, 1, keys]) or MPT's `position_bias` ([heads, 1, keys]),
    or None."""
    try:
        params = inspect.signature(type(attn).forward).parameters
    except (TypeError, ValueError):
        return None
    return next((p for p in ("alibi", "position_bias") if p in params), None)


def per_head_norm(norm: nn.Module, attn: nn.Module, config) -> bool:
    """Whether a norm inside attention normalises each head on its own with one weight of head_dim features
    (Qwen3's), rather than all heads' features together (OLMo2's) or with a weight per head (Cohere's)."""
    weight = getattr(norm, "weight", None)
    return weight is None or weight.numel() == heads(attn, config)[2]  # one weight shared by all heads


def norm_pieces(norm: nn.Module, attn: nn.Module, config) -> tuple[Piece, ...] | None:
    """The heads of a norm inside attention whose weight covers all query heads or all kv heads (the
    features of q_proj's or k_proj's output), or None."""
    hq, hkv, d = heads(attn, config)
    weight = getattr(norm, "weight", None)
    numel = weight.numel() if weight is not None else 0
    return (Piece(hq, d),) if numel == hq * d else (Piece(hkv, d),) if numel == hkv * d else None


def attention_above(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The name of an attention module that holds `name` deeper than as its direct child, or None."""
    parts = name.split(".")
    for depth in range(len(parts) - 2, -1, -1):
        ancestor = ".".join(parts[:depth])
        if is_attention(modules[ancestor]):
            return ancestor
    return None


def per_head_params(attn: nn.Module, config) -> list[str]:
    """The names of an attention module's own parameters known to hold one value per query head (GPT-OSS's
    `sinks`, Beam's `gate_bias`); [] when it has none or its head counts cannot be told. By name, not by size: DiffLlama's
    lambdas have head_dim values, which can equal the head count."""
    own = [(n, p) for n, p in attn.named_parameters(recurse=False) if n in PER_HEAD_PARAMS]
    if not own:
        return []
    try:
        hq = heads(attn, config)[0]
    except ValueError:
        return []
    return [n for n, p in own if p.dim() == 1 and p.numel() == hq]


def is_moe(module: nn.Module) -> bool:
    """Whether `module` is a mixture-of-experts block: it holds an experts module with 3-D weights."""
    return any(is_experts(child) for child in module.children())


def is_mlp(module: nn.Module) -> bool:
    """Whether `module` holds an MLP's column and row layers, by name."""
    return any(hasattr(module, c) for c in MLP_COLUMNS) and any(hasattr(module, r) for r in MLP_ROWS)


def is_norm(leaf: str, module: nn.Module) -> bool:
    return "norm" in leaf.lower() or "norm" in type(module).__name__.lower()


_PLAIN_LINEAR: dict[type, bool] = {}


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose forward is x @ W.T + b: nn.Linear's own, or a subclass's that computes the same
    (Falcon's FalconLinear), checked once per class on a copy with random weights and input."""
    if not isinstance(module, nn.Linear):
        return False
    cls = type(module)
    if cls.forward is nn.Linear.forward:
        return True
    if cls not in _PLAIN_LINEAR:
        probe = probe_copy(module)
        x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0))
        _PLAIN_LINEAR[cls] = not probe_disagrees(
            lambda: (probe.forward(x), F.linear(x, probe.weight, probe.bias)),
            rtol=1e-5,
            atol=1e-6,
            differs="differs",
        )
    return _PLAIN_LINEAR[cls]


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face Conv1D (GPT-2's linear layer with a transposed weight [in, out]: x @ W + b), by its class
    name and attributes, so transformers need not be imported."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == module.nf
        and getattr(module, "bias", None) is not None
    )


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a plain nn.Linear or a Conv1D, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def elementwise_with_scalars(module: nn.Module) -> bool:
    """Whether `module` has only scalar parameters and maps each feature on its own (checked on a copy:
    its output on either half of the features is that half of its output on all of them)."""
    if isinstance(module, (nn.Linear, nn.Embedding)) or any(p.numel() != 1 for p in module.parameters()):
        return False
    probe = probe_copy(module)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            full = probe.forward(x)
            return all(
                torch.allclose(full[:, half], probe.forward(x[:, half]), rtol=1e-6, atol=1e-7)
                for half in (slice(0, 4), slice(4, 8))
            )
    except Exception:  # not a function of one tensor of features
        return False
