"""Reading a model's structure: which modules are attention, MLPs, norms, mixture-of-experts blocks, what their
head counts are, and how a packed or head-structured projection lays out its features.

Pure functions of the modules (and the model's config); no sharding, no plan. The styles and auto_plan use
them; nothing here imports them back.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

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
    "PACKED_MLP_COLUMNS",
    "MLP_ROWS",
    "QUERY_KEY_VALUE",
    "SPLIT_ATTENTION",
    "SPLIT_MLP",
    "EMBEDDINGS",
    "POSITION_EMBEDDINGS",
    "EMBEDDING_PROJECTIONS",
    "LM_HEADS",
    "HEAD_TRANSFORMS",
    "POOLERS",
    "ADAPTER_HOLDERS",
    "WIDTH_FROM_INPUT",
    "SEQUENCE_FROM_INPUT",
    "REPLICATED_HEADS",
    "MOE_REPLICATED",
    "OUTPUT_BIASES",
    "heads",
    "is_attention",
    "is_self_attention",
    "split_attention_output",
    "split_mlp_part",
    "sequential_mlp_part",
    "is_pooler",
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
    "separate_inputs",
    "grouped_qkv",
    "interleaved_blocks",
    "hidden_states_arg",
    "layer_block",
    "decoder_stack",
    "model_layer",
]

# The input projections of an attention module, by name: separate q/k/v (BERT's query / key / value, CTRL's
# Wq / Wk / Wv, XLM's q_lin / k_lin / v_lin), a packed qkv_proj, query_key_value (GPT-NeoX's: each head's q,
# k and v rows together; BLOOM's the same), GPT-2's c_attn Conv1D ([q | k | v]), MPT's Wqkv ([q | k | v]).
QUERY_KEY_VALUE = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("Wq", "Wk", "Wv"),
    ("q_lin", "k_lin", "v_lin"),
)
ATTENTION_INPUTS = (
    *(name for triple in QUERY_KEY_VALUE for name in triple),
    "qkv_proj",
    "query_key_value",
    "c_attn",
    "Wqkv",
)
# Its output projection (GPT-2's c_proj, which is also the MLP's row layer: told apart by the parent; XLM's
# out_lin; ModernBERT's Wo, its MLP's row layer's name too).
ATTENTION_OUTPUTS = ("o_proj", "dense", "out_proj", "c_proj", "out_lin", "Wo")
# BERT's attention is split over two modules: `self` holds query / key / value, `output` the output projection
# `dense` (and the residual's LayerNorm); its MLP too: `intermediate.dense` (column), `output.dense` (row).
SPLIT_ATTENTION = ("self", "output")
SPLIT_MLP = ("intermediate", "output")
ATTENTION_PROJECTIONS = frozenset(ATTENTION_INPUTS) | frozenset(ATTENTION_OUTPUTS)
# An MLP's column and row layers (XLM's lin1 / lin2, ModernBERT's Wi / Wo); packed: gate and up in one layer,
# two equal halves (ModernBERT's Wi too).
MLP_COLUMNS = frozenset(
    {
        "gate_proj",
        "up_proj",
        "gate_up_proj",
        "c_fc",
        "fc1",
        "fc_in",
        "dense_h_to_4h",
        "w1",
        "w3",
        "lin1",
        "Wi",
    }
)
PACKED_MLP_COLUMNS = frozenset({"gate_up_proj", "Wi"})
MLP_ROWS = frozenset({"down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "lin2", "Wo"})
# The vocabulary embedding, by name (besides the model's get_input_embeddings(), and an embedding tied to the
# output layer: plans.py reads those from the model).
EMBEDDINGS = frozenset(
    {"embed_tokens", "embed_in", "wte", "tok_embeddings", "word_embeddings", "tokens_embed"}
)
# Learned absolute positions and BERT's token types: replicated (they run before the first decoder layer, on
# the whole sequence).
POSITION_EMBEDDINGS = frozenset(
    {"wpe", "embed_positions", "position_embeddings", "positions_embed", "token_type_embeddings"}
)
# Projections of the embeddings to the hidden size, before the first layer (ELECTRA's, RemBERT's): replicated.
# Fuyu's vision_embed_tokens projects image patches into the text embedding's sequence the same way.
EMBEDDING_PROJECTIONS = frozenset(
    {"embeddings_project", "embedding_hidden_mapping_in", "vision_embed_tokens"}
)
# A language model's output layer, by name (embed_out: older GPT-NeoX; BioGPT's and TrOCR's
# output_projection, Whisper's proj_out), besides the model's get_output_embeddings().
LM_HEADS = ("lm_head", "embed_out", "output", "output_projection", "proj_out")
# The dense layer of a masked-LM style head between the last layer and the output layer (BERT's
# cls.predictions.transform.dense, RoBERTa's lm_head.dense, ELECTRA's generator_predictions.dense), by its
# parent's name: replicated (under SP it sees sequence shards, so its gradients are summed over the group).
HEAD_TRANSFORMS = frozenset({"transform", "lm_head", "predictions", "generator_predictions"})
# X-MOD's per-language adapters (a small MLP per language, run on the tokens of that language after the layer's
# output): replicated; under SP they would get a shard's tokens against the full sequence's language ids.
ADAPTER_HOLDERS = frozenset({"adapter_modules"})
# Model code that takes a size tpext changes from an activation's shape, by class name (refused): TrOCR's
# attention reshapes its output to its input's width, not its heads'; OpenAI GPT's model views its stack's
# output to the input's shape, which under SP is a sequence shard.
WIDTH_FROM_INPUT = frozenset({"TrOCRAttention"})
SEQUENCE_FROM_INPUT = frozenset({"OpenAIGPTModel"})
# BERT's pooler (a module of its own with `dense`, or BigBird's nn.Linear): it reads the first token of the
# stack's output.
POOLERS = frozenset({"pooler"})
# Small task heads (sequence / token classification, question answering): replicated; under SP they read
# the full sequence, gathered at the decoder stack's output.
REPLICATED_HEADS = frozenset({"score", "qa_outputs", "classifier"})
# Beside a mixture-of-experts module: its router and a shared expert's gate, replicated (they see the
# block's replicated input; the experts' all-reduce sums the gradients that reach them through the experts).
MOE_REPLICATED = frozenset({"gate", "router", "shared_expert_gate"})
# An attention module's own parameters with one value per query head, sliced with its heads.
PER_HEAD_PARAMS = frozenset({"sinks", "gate_bias"})  # GPT-OSS's sinks, Beam's output-gate bias
# An attention module's own bias of its output, which the layer adds after the output projection's reduction
# (GPT-NeoX-Japanese's dense_bias): replicated.
OUTPUT_BIASES = frozenset({"dense_bias"})


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
    kv_names = ("num_key_value_heads", "kv_heads", "num_kv_heads")
    own_groups = getattr(attn, "num_key_value_groups", None)
    if hq and not any(hasattr(attn, n) for n in kv_names) and isinstance(own_groups, int) and own_groups > 0:
        # The module's own grouping before the config's kv heads: MiMo-V2-Flash's sliding-window layers hold
        # twice the config's kv heads (and num_key_value_groups to match), its other layers the config's.
        hkv = hq // own_groups
    else:
        hkv = pick(*kv_names) or (hq // g if hq and (g := pick("num_key_value_groups")) else hq)
    d = pick("head_dim", "attention_head_size")  # attention_head_size: BERT's
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
    """Whether `module` holds an attention module's input and output projections, by name, or is the half of
    a split attention that holds its query, key and value (BERT's `attention.self`, `is_self_attention`)."""
    return (
        any(hasattr(module, p) for p in ATTENTION_OUTPUTS)
        and any(hasattr(module, p) for p in ATTENTION_INPUTS)
        and not any(hasattr(module, c) for c in ("c_fc",))
    ) or is_self_attention(module)  # GPT-2's MLP has a c_proj too, and no c_attn


def is_self_attention(module: nn.Module) -> bool:
    """Whether `module` is the query/key/value half of an attention split over two modules (BERT's
    `attention.self`): query, key and value layers (nn.Linear, or what parallelize made of them) and no output
    projection of its own; the output projection is `dense` in its sibling `output` (`split_attention_output`)."""
    return all(isinstance(getattr(module, p, None), nn.Module) for p in QUERY_KEY_VALUE[1]) and not any(
        hasattr(module, p) for p in ATTENTION_OUTPUTS
    )


def split_attention_output(name: str, modules: dict[str, nn.Module]) -> nn.Module | None:
    """For the output projection of a split attention (BERT's `attention.output.dense`), the attention module
    whose heads its input features are (`attention.self`); None for any other module."""
    holder, _, leaf = name.rpartition(".")
    owner, _, part = holder.rpartition(".")
    if (leaf, part) != ("dense", SPLIT_ATTENTION[1]) or owner not in modules:
        return None
    attn = getattr(modules[owner], SPLIT_ATTENTION[0], None)
    return attn if isinstance(attn, nn.Module) and is_self_attention(attn) else None


def split_mlp_part(name: str, modules: dict[str, nn.Module]) -> str | None:
    """For a layer of an MLP split over two modules (BERT's `intermediate.dense` and `output.dense`, siblings
    in the layer), which half it is ("intermediate": column, "output": row); None for any other module."""
    holder, _, leaf = name.rpartition(".")
    owner, _, part = holder.rpartition(".")
    if leaf != "dense" or part not in SPLIT_MLP or owner not in modules:
        return None
    halves = [getattr(modules[owner], p, None) for p in SPLIT_MLP]
    if all(isinstance(getattr(h, "dense", None), nn.Linear) for h in halves):
        return part
    return None


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
        **{
            leaf_name: (Piece(hq if i == 0 else hkv, d),)
            for triple in QUERY_KEY_VALUE
            for i, leaf_name in enumerate(triple)
        },
    }[leaf]


def interleaved_blocks(attn: nn.Module) -> int:
    """How many [q | v | k] blocks an attention module's qkv_proj interleaves (CodeGen's: 4, fixed in its code),
    or 0."""
    return 4 if type(attn).__name__.startswith("CodeGen") and hasattr(attn, "qkv_proj") else 0


def grouped_qkv(attn: nn.Module) -> bool:
    """Whether an attention module packs each kv head with its group of query heads (Falcon's new decoder):
    its kv heads cannot be replicated over ranks, each group must stay whole."""
    return hasattr(attn, "query_key_value") and getattr(attn, "new_decoder_architecture", False) is True


def separate_inputs(attn: nn.Module) -> bool:
    """Whether an attention module's forward takes its query, key and value inputs as separate activations
    (CTRL's forward(v, k, q, ...)), which under SP tpext does not gather (it gathers the first one)."""
    try:
        params = list(inspect.signature(type(attn).forward).parameters)[1:3]
    except (TypeError, ValueError):
        return False
    return len(params) == 2 and all(p in ("q", "k", "v", "query", "key", "value") for p in params)


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


def sequential_mlp_part(name: str, modules: dict[str, nn.Module]) -> str | None:
    """For a layer of an MLP written as an nn.Sequential (CTRL's ffn: Linear, activation, Linear), which end it
    is ("column": the first, "row": the last); None for any other module. Only parameterless modules may sit
    between the two, and the MLP must map the hidden size to itself."""
    holder = modules.get(name.rpartition(".")[0])
    if not isinstance(holder, nn.Sequential) or len(holder) < 2:
        return None
    first, last = holder[0], holder[len(holder) - 1]
    middle = [m for m in list(holder)[1:-1] if any(True for _ in m.parameters())]
    if not (isinstance(first, nn.Linear) and isinstance(last, nn.Linear)) or middle:
        return None
    if (first.in_features, first.out_features) != (last.out_features, last.in_features):
        return None
    module = modules[name]
    return "column" if module is first else "row" if module is last else None


def is_pooler(name: str, module: nn.Module) -> bool:
    """Whether `module` is a pooler's linear layer (`pooler` itself, or its `dense`), by name."""
    parts = name.split(".")
    return isinstance(module, nn.Linear) and (
        parts[-1] in POOLERS or (len(parts) > 1 and parts[-1] == "dense" and parts[-2] in POOLERS)
    )


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


def hidden_states_arg(
    module: nn.Module, args: tuple, kwargs: dict
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple]]:
    """The activation a decoder layer or attention module is called with (its first positional argument,
    or hidden_states=), and how to call it with another one instead."""
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], lambda x: (args, {**kwargs, "hidden_states": x})
    raise TypeError(
        f"tpext.parallelize: under sequence parallelism {type(module).__name__} must be called with "
        "its activations as the first positional argument or as hidden_states="
    )


def layer_block(name: str, modules: dict[str, nn.Module]) -> str:
    """The decoder-layer block that holds `name` (or is it): a child of one element of the model's outermost
    layer list (model.layers.0.mamba for model.layers.0.mamba.conv1d); "" for a module outside one, and for
    a layer itself."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if isinstance(modules[".".join(parts[:i])], nn.ModuleList) and parts[i].isdigit():
            return ".".join(parts[: i + 2])
    return ""


def decoder_stack(model: nn.Module, modules: dict[str, nn.Module]) -> str:
    """The name of the language model's layer list: the nn.ModuleList beside the model's word embedding
    (model.language_model.layers beside model.language_model.embed_tokens; of several, the one with
    attention modules), "" when there is none."""
    embedding = model_layer(model, "get_input_embeddings")
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
        lists = [n for n in lists if any(is_attention(m) for m in modules[n].modules())]
    return lists[0] if len(lists) == 1 else ""


def model_layer(model: nn.Module, getter: str) -> nn.Module | None:
    """The module a Hugging Face model's get_input_embeddings / get_output_embeddings returns, or None."""
    try:
        layer = getattr(model, getter)()
    except Exception:  # noqa: BLE001 - not a Hugging Face model, or one whose getter is not implemented
        return None
    return layer if isinstance(layer, nn.Module) else None
