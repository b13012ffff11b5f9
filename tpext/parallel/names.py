"""The plan tpext reads from a model's module names and structure (auto_plan's second source).

Attention projections by name (q/k/v and o, packed qkv, and the other spellings in
tpext.parallel.structure), MLP columns and rows, embeddings, the output layer, norms, experts and their
routers, each given a style; what the names and structure cannot place is returned with the reason, for
auto_plan to replicate (tpext.parallel.replicated) or refuse.
"""

from __future__ import annotations

import torch
from torch import nn

from tpext.nn.experts import _layouts as _expert_layouts
from tpext.nn.experts import is_experts
from tpext.parallel import mamba, mla
from tpext.parallel import structure as st
from tpext.parallel.styles import (
    Colwise,
    Experts,
    Replicate,
    Rowwise,
    SequenceParallel,
    Style,
    Vocab,
)
from tpext.sharding import Piece

__all__ = ["plan_from_names"]


def plan_from_names(
    model: nn.Module, *, sequence_parallel: bool, vocab_parallel_logits: bool, tp_size: int | None = None
) -> dict[str, Style | str]:
    """{name: style} for every module with weights that its name and structure place, {name: why not} for
    the others (a str)."""
    config = getattr(model, "config", None)
    plan: dict[str, Style | str] = {}
    modules = dict(model.named_modules())
    latent_attention = mla.plan_entries(modules, config)  # MLA: heads of its own sizes (tpext.parallel.mla)
    mixers = mamba.plan_entries(modules, tp_size)  # Mamba mixers, by heads or channels (tpext.parallel.mamba)
    # The model's own word embedding and output layer (Hugging Face's get_input_embeddings /
    # get_output_embeddings), whatever their names; an embedding tied to the output layer is the vocabulary's.
    embedding, output = (
        st.model_layer(model, "get_input_embeddings"),
        st.model_layer(model, "get_output_embeddings"),
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
            if not st.layer_block(name, modules):
                raise ValueError(f"tpext.parallelize: {name} ({type(module).__name__}): {why}") from exc
            plan[name] = f"{type(module).__name__}: {why}"
    if refused := [n for n in sp_refusals if st.layer_block(n, modules)]:
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
