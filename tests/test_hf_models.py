"""tpext.parallelize on Hugging Face transformers models vs the dense model.

Hugging Face code takes shapes from its activations: the model derives positions and the causal mask
from the embedding output, attention reshapes by its input's sequence length, and the loss reads logits
as [*, V]. Under SP and with a vocab-parallel lm_head all of that must still see the dense shapes.
Checked: logits, the labels loss and every parameter gradient, fp32, tp 2 and 4, SP on and off, kv heads
above, equal to and below tp, a padded batch, Llama (sdpa and eager attention), Mistral, Qwen2 (q/k/v
biases), Qwen3 (per-head q/k norms, tied embeddings), Gemma (a scaled embedding subclass, norms that
scale by 1 + weight), Cohere (mean-centred norms without bias, attention and MLP side by side, q/k
norms with a weight per head), Phi3 (packed qkv / gate_up, split at the config's head count), OLMo2
(q/k RMSNorms over all heads' features, kv heads replicated at tp 4), Gemma2 (four norms a layer,
attention and final logit soft-capping, sliding-window layers) and Apertus (a learned activation with
scalar parameters between the MLP's layers), Phi (dense as o_proj, partial rotary, fc1 / fc2, an lm_head
with a bias) and GPT-NeoX (query_key_value with each head's q, k and v rows together, LayerNorms with
biases, attention and MLP side by side), GPT-J (out_proj, fc_in / fc_out; without SP) and XGLM (sinusoidal
positions, attention reshaping by its embed_dim), the classic families (GPT-2's Conv1D layers and wpe, OPT,
BLOOM and MPT with ALiBi slopes per rank's heads, Falcon's FalconLinear and its three query_key_value layouts,
GPT-BigCode's multi-query c_attn, CodeGen's interleaved qkv_proj), and mixture-of-experts models with the router's
load-balancing loss in the loss: Mixtral, Qwen2-MoE (a shared expert and its gate beside the experts,
a dense first layer), Qwen3-MoE and OLMoE: the model's own
embedding, norm, activation, attention and experts code runs unchanged (OLMo2's q/k norms excepted: their
statistic spans the group). Also greedy generation with gathered logits, token
for token, and heads with replicated weights (sequence classification) and base models under SP.
"""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_lm_matches, lm_step, tiny_hf_model
from dist import SMALL_LLAMA, case_result, run_cases, run_ranks

import tpext
from tpext import mappings
from tpext.sharding import Piece, layouts

transformers = pytest.importorskip("transformers")

# the tiny Llama's sizes; kv heads are set per case where the model has GQA
SMALL = {k: v for k, v in SMALL_LLAMA.items() if k != "num_key_value_heads"} | dict(
    max_position_embeddings=64, use_cache=False
)
TOL = dict(rtol=1e-5, atol=1e-6)
# Gemma2's tied embedding gradient sums the soft-capped logits' and the lookup's fp32 terms in another
# order at tp 4: single elements differ by ~1.3e-6.
GRAD_TOL = {"gemma2": dict(rtol=1e-5, atol=3e-6)}

# (architecture, kv heads, sequence_parallel, attention implementation, padded batch)
CASES = [
    ("llama", 4, False, "sdpa", False),
    ("llama", 4, True, "sdpa", False),
    ("llama", 2, True, "eager", True),
    ("llama", 1, True, "sdpa", False),
    ("mistral", 2, True, "sdpa", True),
    ("qwen2", 2, True, "sdpa", False),
    ("qwen3", 1, True, "eager", False),
    ("qwen3", 4, False, "sdpa", True),
    ("gemma", 2, True, "sdpa", True),
    ("gemma", 4, False, "eager", False),
    ("cohere", 2, True, "sdpa", False),
    ("phi3", 2, True, "sdpa", True),
    ("olmo2", 2, True, "sdpa", True),
    ("olmo2", 1, False, "eager", False),
    ("gemma2", 2, True, "eager", True),
    ("apertus", 2, True, "sdpa", False),
    ("phi", 2, True, "sdpa", True),
    ("gpt_neox", 8, True, "eager", True),
    ("gpt_neox", 8, False, "sdpa", False),
    ("gptj", 8, False, "eager", True),
    ("xglm", 8, True, "eager", True),
    ("mixtral", 2, False, "sdpa", False),
    ("mixtral", 2, True, "sdpa", True),
    ("qwen2_moe", 2, True, "sdpa", True),
    ("qwen3_moe", 4, False, "eager", False),
    ("olmoe", 2, True, "sdpa", False),
    ("gpt2", 8, False, "eager", True),
    ("gpt2", 8, False, "sdpa", False),
    ("opt", 8, False, "sdpa", True),
    ("opt", 8, False, "eager", False),
    ("bloom", 8, True, "eager", True),
    ("bloom", 8, False, "eager", False),
    ("gpt_bigcode", 8, False, "eager", True),
    ("gpt_bigcode", 8, False, "sdpa", False),
    ("gpt_bigcode_mha", 8, False, "sdpa", True),
    ("mpt", 8, True, "eager", True),
    ("mpt", 8, False, "eager", False),
    ("falcon", 8, True, "sdpa", True),
    ("falcon", 8, False, "eager", False),
    ("falcon_new", 8, True, "eager", True),
    ("falcon_mha", 8, False, "sdpa", False),
    ("codegen", 16, False, "eager", True),
]


_IDS = dict(
    pad_token_id=0, eos_token_id=1, bos_token_id=1
)  # their default token ids are beyond this vocabulary
_SMALL_HEADS = dict(head_dim=8, tie_word_embeddings=True)  # as the small ones
# architecture: (config class, model class, config settings); kv heads are set where the model has GQA
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _SMALL_HEADS),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _SMALL_HEADS),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**_SMALL_HEADS, **_IDS}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {**_IDS, "use_qk_norm": True}),  # a weight per head
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _IDS),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _IDS),
    "apertus": ("ApertusConfig", "ApertusForCausalLM", _IDS),
    "phi": ("PhiConfig", "PhiForCausalLM", _IDS),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _IDS),
    # rotary over part of each head, MLP width n_inner
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        {**_IDS, "rotary_dim": 4, "n_inner": SMALL["intermediate_size"]},
    ),
    # its dropout is on by default
    "xglm": (
        "XGLMConfig",
        "XGLMForCausalLM",
        {**_IDS, "ffn_dim": SMALL["intermediate_size"], "dropout": 0.0, "attention_dropout": 0.0},
    ),
}
_MOE = dict(output_router_logits=True, router_aux_loss_coef=0.5, num_experts_per_tok=2)  # the aux loss counts
ARCHS.update(
    {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_MOE, "num_local_experts": 4}),
        # a shared expert (an MLP) and its sigmoid gate beside the routed experts; the first layer's MLP dense
        "qwen2_moe": (
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            {
                **_MOE,
                "num_experts": 4,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 48,
                "mlp_only_layers": [0],
            },
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            {**_MOE, **_SMALL_HEADS, "num_experts": 8, "moe_intermediate_size": 32},
        ),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**_MOE, **_IDS, "num_experts": 4}),
    }
)
# The classic families: GPT-2 (Conv1D layers, c_attn packed [q | k | v], learned positions wpe), OPT (fc1 / fc2
# in the decoder layer, learned positions embed_positions); their dropout is on by default.
_GPT2_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
ARCHS.update(
    {
        "gpt2": (
            "GPT2Config",
            "GPT2LMHeadModel",
            {**_IDS, **_GPT2_DROPOUT, "n_inner": SMALL["intermediate_size"]},
        ),
        "opt": (
            "OPTConfig",
            "OPTForCausalLM",
            {
                **_IDS,
                "ffn_dim": SMALL["intermediate_size"],
                "dropout": 0.0,
                "word_embed_proj_dim": SMALL["hidden_size"],
            },
        ),
    }
)
ARCHS["bloom"] = (
    "BloomConfig",
    "BloomForCausalLM",
    {**_IDS, "hidden_dropout": 0.0, "attention_dropout": 0.0},
)
# multi_query: c_attn is [q | k | v] with one kv head, replicated on every rank; without it each head's q, k, v
ARCHS["gpt_bigcode"] = (
    "GPTBigCodeConfig",
    "GPTBigCodeForCausalLM",
    {**_IDS, **_GPT2_DROPOUT, "n_inner": SMALL["intermediate_size"]},
)
ARCHS["gpt_bigcode_mha"] = (
    "GPTBigCodeConfig",
    "GPTBigCodeForCausalLM",
    {**ARCHS["gpt_bigcode"][2], "multi_query": False},
)
ARCHS["mpt"] = (
    "MptConfig",
    "MptForCausalLM",
    {
        **_IDS,
        "d_model": SMALL["hidden_size"],
        "n_heads": 8,
        "n_layers": 2,
        "max_seq_len": 64,
        "expansion_ratio": 2,
    },
)
# Falcon: FalconLinear (an nn.Linear subclass computing x @ W.T + b), multi-query query_key_value by default;
# the new decoder packs each kv head with its query heads (4 kv heads here), the old without multi-query
# each head's q, k, v together
_FALCON = {**_IDS, "hidden_dropout": 0.0, "attention_dropout": 0.0}
ARCHS.update(
    {
        "falcon": ("FalconConfig", "FalconForCausalLM", _FALCON),
        "falcon_new": (
            "FalconConfig",
            "FalconForCausalLM",
            {**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 4},
        ),
        "falcon_mha": ("FalconConfig", "FalconForCausalLM", {**_FALCON, "multi_query": False}),
    }
)
# CodeGen: qkv_proj is 4 blocks of [q | v | k]; 16 heads, so that a block's 4 heads split over 4 ranks
ARCHS["codegen"] = (
    "CodeGenConfig",
    "CodeGenForCausalLM",
    {
        **_IDS,
        "num_attention_heads": 16,
        "rotary_dim": 4,
        "n_inner": 96,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
)
# The zoo families tpext.parallel learned from the census (ZOO_CASES): BitNet (an RMSNorm between the MLP's
# column and row layers, over the sharded intermediate features), GPT-OSS (attention sinks, one per head,
# sliced with the heads; expert biases), PhiMoE and Llama 4 (routers with a forward of their own; Llama 4's
# shared expert and flattened MoE output), Ernie-4.5-MoE and HunYuan-MoE (routers holding modules), BART's
# decoder (its own loss over gathered logits).
ARCHS.update(
    {
        "bitnet": ("BitNetConfig", "BitNetForCausalLM", _IDS),
        "gpt_oss": (
            "GptOssConfig",
            "GptOssForCausalLM",
            {**_MOE, **_IDS, "num_local_experts": 4, "head_dim": 8},
        ),
        "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", {**_MOE, **_IDS, "num_local_experts": 4}),
        "llama4_text": (
            "Llama4TextConfig",
            "Llama4ForCausalLM",
            {**_MOE, **_IDS, "num_local_experts": 4, "head_dim": 8, "intermediate_size_mlp": 96},
        ),
        "ernie4_5_moe": (
            "Ernie4_5_MoeConfig",
            "Ernie4_5_MoeForCausalLM",
            {
                **_IDS,
                "moe_num_experts": 4,
                "moe_k": 2,
                "moe_intermediate_size": 32,
                "moe_num_shared_experts": 1,
            },
        ),
        "hunyuan_v1_moe": (
            "HunYuanMoEV1Config",
            "HunYuanMoEV1ForCausalLM",
            {**_IDS, "num_experts": 4, "moe_topk": 2, "head_dim": 8},
        ),
        "bart": (
            "BartConfig",
            "BartForCausalLM",
            {
                **_IDS,
                "d_model": 64,
                "decoder_layers": 2,
                "decoder_attention_heads": 8,
                "decoder_ffn_dim": 96,
                "dropout": 0.0,
                "attention_dropout": 0.0,
                "activation_dropout": 0.0,
            },
        ),
    }
)
# BERT-style encoders registered for causal LM: attention split over attention.self (query / key / value) and
# attention.output (dense), the MLP over intermediate.dense and output.dense, token types and positions before
# the layers, a masked-LM style head (a dense transform and a norm before the output layer, which computes its
# loss over gathered logits) with the output layer tied to the word embeddings and its bias to its holder's.
# ELECTRA and RoFormer project a narrower embedding to the hidden size, RemBERT between its embedding and the
# layers; RoCBert adds pronunciation and shape embeddings; RoFormer rotates q and k; RoBERTa-PreLayerNorm,
# XLM-RoBERTa-XL and Megatron-BERT normalise before attention; BigBird with full attention keeps a pooler.
_ENCODER = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True, **_IDS)
ENCODERS = {
    "bert": ("BertConfig", "BertLMHeadModel", {}),
    "bert-generation": ("BertGenerationConfig", "BertGenerationDecoder", {}),
    "big_bird": ("BigBirdConfig", "BigBirdForCausalLM", {"attention_type": "original_full"}),
    "camembert": ("CamembertConfig", "CamembertForCausalLM", {}),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextForCausalLM", {}),
    "electra": ("ElectraConfig", "ElectraForCausalLM", {"embedding_size": 32}),
    "ernie": ("ErnieConfig", "ErnieForCausalLM", {}),
    "megatron-bert": ("MegatronBertConfig", "MegatronBertForCausalLM", {}),
    "rembert": (
        "RemBertConfig",
        "RemBertForCausalLM",
        {"input_embedding_size": 32, "output_embedding_size": 48},
    ),
    "roberta": ("RobertaConfig", "RobertaForCausalLM", {}),
    "roberta-prelayernorm": ("RobertaPreLayerNormConfig", "RobertaPreLayerNormForCausalLM", {}),
    "roc_bert": (
        "RoCBertConfig",
        "RoCBertForCausalLM",
        {
            "pronunciation_vocab_size": 20,
            "shape_vocab_size": 30,
            "pronunciation_embed_dim": 16,
            "shape_embed_dim": 16,
        },
    ),
    "roformer": ("RoFormerConfig", "RoFormerForCausalLM", {"embedding_size": 32}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForCausalLM", {}),
    "xlm-roberta-xl": ("XLMRobertaXLConfig", "XLMRobertaXLForCausalLM", {}),
}
ARCHS.update({arch: (cfg, cls, {**_ENCODER, **extra}) for arch, (cfg, cls, extra) in ENCODERS.items()})
# Refused under SP (test_encoder_refusals): BigBird's pooler reads the first token of each rank's shard,
# CamemBERT and XLM-RoBERTa register their head before the layers, ELECTRA, RemBERT and RoFormer narrow or
# widen the stack's output before the output layer.
_ENCODERS_WITHOUT_SP = ("big_bird", "camembert", "xlm-roberta", "electra", "rembert", "roformer")
# Classic names: BioGPT's output_projection, OpenAI GPT's tokens_embed / positions_embed, CTRL's Wq / Wk / Wv /
# dense and its nn.Sequential MLP, XLM's q_lin / k_lin / v_lin / out_lin and lin1 / lin2 (under SP refused),
# ModernBERT's Wo and packed Wi, Whisper's decoder with its proj_out.
_GPT_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, **_IDS)
CLASSICS = {
    "biogpt": (
        "BioGptConfig",
        "BioGptForCausalLM",
        {**_IDS, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "activation_dropout": 0.0},
    ),
    "openai-gpt": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", {**_GPT_DROPOUT, "attn_pdrop": 0.0}),
    "ctrl": ("CTRLConfig", "CTRLLMHeadModel", {**_GPT_DROPOUT, "dff": SMALL["intermediate_size"]}),
    "xlm": (
        "XLMConfig",
        "XLMWithLMHeadModel",
        {**_IDS, "dropout": 0.0, "attention_dropout": 0.0, "causal": True},
    ),
    "modernbert-decoder": ("ModernBertDecoderConfig", "ModernBertDecoderForCausalLM", _IDS),
    "whisper": (
        "WhisperConfig",
        "WhisperForCausalLM",
        {
            **_IDS,
            "decoder_layers": 2,
            "decoder_attention_heads": 8,
            "encoder_attention_heads": 8,
            "decoder_ffn_dim": SMALL["intermediate_size"],
            "dropout": 0.0,
        },
    ),
}
# GPT-NeoX-Japanese: its last attention module holds the output bias the layer adds after the reduction
CLASSICS["gpt_neox_japanese"] = (
    "GPTNeoXJapaneseConfig",
    "GPTNeoXJapaneseForCausalLM",
    {**_IDS, "hidden_dropout": 0.0, "attention_dropout": 0.0},
)
ARCHS.update(CLASSICS)
# (architecture, kv heads, sequence_parallel, attention implementation, padded batch)
ENCODER_CASES = [
    *((arch, 8, False, "eager", True) for arch in ENCODERS),
    *((arch, 8, True, "eager", False) for arch in ENCODERS if arch not in _ENCODERS_WITHOUT_SP),
    ("bert", 8, True, "sdpa", True),
    ("roberta", 8, False, "sdpa", False),
    *((arch, 8, False, "eager", True) for arch in CLASSICS),
    *((arch, 8, True, "eager", False) for arch in ("biogpt", "modernbert-decoder", "whisper")),
]
ZOO_CASES = [
    ("bitnet", 2, True, "eager", False),
    ("gpt_oss", 2, True, "eager", True),
    ("phimoe", 2, False, "eager", False),
    ("llama4_text", 2, True, "eager", False),
    ("ernie4_5_moe", 2, True, "eager", False),
    ("hunyuan_v1_moe", 2, False, "eager", False),
    ("bart", 8, False, "eager", False),
]  # under SP an error: see test_bart_under_sequence_parallelism
_NO_GQA = (
    "gpt_neox",
    "gptj",
    "xglm",
    "gpt2",
    "opt",
    "bloom",
    "gpt_bigcode",
    "gpt_bigcode_mha",
    "mpt",
    "falcon",
    "falcon_new",
    "falcon_mha",
    "codegen",
    "bart",
    *ENCODERS,
    *CLASSICS,
)  # kv must be the 8 query heads


def _model(arch: str, kv: int, attn: str):
    config_name, model_name, settings = ARCHS[arch]
    extra = dict(settings) if arch in _NO_GQA else dict(settings, num_key_value_heads=kv)

    def moved(name: str) -> bool:  # norms away from their init (Gemma's scales by 1 + weight, from zeros)
        if "norm" in name or "sinks" in name:
            return True
        # BERT's LayerNorms and zero biases too
        return arch in {**ENCODERS, **CLASSICS} and ("Norm" in name or name.endswith("bias"))

    return tiny_hf_model(
        config_name, model_name, {**SMALL, **extra}, torch.float32, attn, scale=0.1, pick=moved
    )


def _compare(
    arch: str,
    kv: int,
    sp: bool,
    attn: str,
    padded: bool,
    share_inputs: bool = True,
    replicate_experts: bool = False,
) -> None:
    world = torch.distributed.get_world_size()
    dense = _model(arch, kv, attn)
    plan = tpext.auto_plan(dense, sequence_parallel=sp)
    if replicate_experts:  # experts tpext cannot shard: under SP their block must still see every token
        plan = {name: "replicate" if style.kind == "experts" else style for name, style in plan.items()}
    model = tpext.parallelize(
        copy.deepcopy(dense), plan=plan, sequence_parallel=sp, share_inputs=share_inputs
    )
    ids = torch.randint(0, SMALL["vocab_size"], (2, 4 * world), generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.2, -100)
    mask, extra = torch.ones_like(ids), {}
    if padded:  # the second sequence is 3 tokens shorter, right-padded; the loss is a sum over a given count
        mask[1, -3:] = 0
        labels[1, -3:] = -100
        extra = {"num_items_in_batch": torch.tensor(7)}
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, **extra)
    ref, out = lm_step(dense, **inputs), lm_step(model, **inputs)  # PhiMoE's router samples: the same draws
    what = (
        f"{arch} tp={world} kv={kv} sp={sp} attn={attn} padded={padded} share_inputs={share_inputs} "
        f"replicate_experts={replicate_experts}"
    )
    assert_lm_matches(model, dense, out, ref, what, GRAD_TOL.get(arch), **TOL)


def _check_cases() -> None:
    for case in CASES:
        _compare(*case)
    _compare("llama", 2, True, "eager", True, share_inputs=False)  # q/k/v each multiply the gathered input
    _compare("qwen3_moe", 2, True, "sdpa", True, replicate_experts=True)


def _check_zoo_cases() -> None:
    for case in ZOO_CASES:
        _compare(*case)


@pytest.mark.parametrize("world", [2, 4])
def test_zoo_families_match_dense(world):
    """Logits, loss and every gradient of the zoo families (ZOO_CASES) against the dense model."""
    run_ranks(_check_zoo_cases, world)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"tp{w}")
def encoder_results(request):
    return run_cases(_compare, request.param, ENCODER_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", ENCODER_CASES, ids=lambda c: f"{c[0]}-sp{c[2]}-{c[3]}-padded{c[4]}")
def test_encoder_families_match_dense(encoder_results, case):
    """Logits, loss and every gradient of the BERT-style encoders (ENCODER_CASES) against the dense model."""
    case_result(encoder_results, case)


@pytest.mark.parametrize(
    "arch, message",
    [
        ("big_bird", r"bert\.pooler \(Linear, a pooler of the first token of the stack's output"),
        ("camembert", r"lm_head\.decoder \(Linear, the output layer, registered before the layers"),
        (
            "electra",
            r"generator_lm_head \(Linear, the output layer, fed 32 features where the layers output 64",
        ),
        ("roformer", r"cls\.predictions\.decoder \(Linear, the output layer, fed 32 features"),
    ],
)
def test_encoder_refusals_under_sequence_parallelism(arch, message):
    """Encoders whose head cannot take the stack's output shards are refused under SP, naming the module and
    the cause. (OpenAI GPT, whose model reshapes the stack's output, is refused at its first forward: the
    census records it.)"""
    with pytest.raises(ValueError, match=message):
        tpext.auto_plan(_model(arch, 8, "eager"), sequence_parallel=True)


@pytest.mark.parametrize(
    "arch, message",
    [
        (
            "ctrl",
            r"multi_head_attention\.Wq \(Linear in MultiHeadAttention, whose forward takes query, key and value",
        ),
        (
            "gpt_neox_japanese",
            r"layers\.1\.attention \(GPTNeoXJapaneseAttention with an output bias of its own",
        ),
    ],
)
def test_attention_unshardable_under_sp_is_refused(arch, message):
    """Under SP, CTRL's attention (q, k and v passed separately) and GPT-NeoX-Japanese's (an output bias of
    its own added to sequence shards) cannot run on shards, whether sharded or replicated: auto_plan refuses,
    naming the module and the cause (without SP the block is sharded or replicated)."""
    with pytest.raises(ValueError, match=r"under sequence parallelism tpext cannot run .*" + message):
        tpext.auto_plan(_model(arch, 8, "eager"), sequence_parallel=True)


def test_block_sparse_attention_is_replicated():
    """BigBird's block-sparse attention (its default) is rebuilt from the config in forward: replicated whole,
    saying why; its full attention is sharded."""
    config_name, model_name, settings = ARCHS["big_bird"]
    config = getattr(transformers, config_name)(**{**SMALL, **settings, "attention_type": "block_sparse"})
    plan = tpext.auto_plan(getattr(transformers, model_name)(config))
    block = "bert.encoder.layer.0.attention"
    assert plan[block] == tpext.parallel.Replicate(full_sequence=True)
    assert "block-sparse attention (BigBird's)" in plan.sources[block]
    assert tpext.auto_plan(_model("big_bird", 8, "eager"))[
        "bert.encoder.layer.0.attention.self.query"
    ].kind == ("colwise")


def _xlm_under_sp() -> str:
    """XLM keeps its attention modules in a list beside lists of its norms and MLPs: no layer module to split
    the sequence at."""
    with pytest.raises(ValueError) as err:
        tpext.parallelize(_model("xlm", 8, "eager"), sequence_parallel=True)
    return str(err.value)


def test_xlm_under_sequence_parallelism_is_an_error():
    message = run_ranks(_xlm_under_sp, 2)[0]
    assert (
        "transformer.attentions.0 sits in a list of attention modules (transformer.attentions" in message
    ), message


def test_trocr_attention_is_refused():
    """TrOCR's attention reshapes its output to its input's width: its projections are named, not sharded."""
    config = transformers.TrOCRConfig(
        d_model=64, decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=96, vocab_size=100
    )
    with pytest.raises(
        ValueError, match=r"self_attn\.k_proj \(Linear in TrOCRAttention, which reshapes its output"
    ):
        tpext.auto_plan(transformers.TrOCRForCausalLM(config))


def _loss_installed() -> list[bool]:
    """The vocab-parallel loss replaces only a causal-LM loss (a masked-LM head's is not shifted)."""
    installed = []
    for loss_type in ("ForCausalLM", "ForMaskedLM"):
        model = _model("llama", 2, "sdpa")
        model.loss_type = loss_type
        tpext.parallelize(model)
        installed.append("_loss_function" in vars(model))
    return installed


def test_loss_replaced_for_causal_lm_only():
    assert run_ranks(_loss_installed, 2)[0] == [True, False]


@pytest.mark.parametrize("world", [2, 4])
def test_hf_model_matches_dense(world):
    run_ranks(_check_cases, world)


def _generate(arch: str) -> list:
    """Greedy decoding with gathered logits (no SP: decoding steps are one token): the dense tokens."""
    dense = _model(arch, 2, "sdpa").eval()
    model = tpext.parallelize(copy.deepcopy(dense), plan=tpext.auto_plan(dense, vocab_parallel_logits=False))
    ids = torch.randint(0, SMALL["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True
    )
    with torch.no_grad():
        ref, out = dense.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(out, ref), f"{arch}: {out.tolist()} != {ref.tolist()}"
    return out.tolist()


def test_generate_matches_dense():
    tokens = run_ranks(_generate, 2, "llama")
    assert tokens[0] == tokens[1]


def _sp_errors() -> list[str]:
    model = tpext.parallelize(_model("llama", 2, "sdpa"), sequence_parallel=True)
    messages = []
    with pytest.raises(ValueError) as err:
        model(input_ids=torch.zeros(2, 6, dtype=torch.long))
    messages.append(str(err.value))
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError) as err:  # generation's prefill keeps the last position's logits only
        model(input_ids=ids, logits_to_keep=1)
    messages.append(str(err.value))
    assert model(input_ids=ids).logits.shape == (2, 8, SMALL["vocab_size"] // 4)
    return messages


def test_sp_errors():
    messages = run_ranks(_sp_errors, 4)[0]
    assert "sequence length (dim 1) divisible by the tensor-parallel size 4" in messages[0], messages[0]
    assert (
        "under sequence parallelism lm_head must get the decoder's output shard (2, 2, 64) whole, got "
        "(2, 1, 64)"
    ) in messages[1], messages[1]


def _heads(sp: bool) -> None:
    """Models with no vocab-parallel lm_head after the decoder stack: a sequence-classification head (small,
    replicated; it pools each sequence's last non-pad token) and a base model whose hidden states feed
    user code. Under SP the stack's output is gathered back, so both see the dense sequence: logits,
    loss, every hidden state and every gradient as the dense model's (fp64, to fp32 accuracy: Hugging
    Face's RMSNorm computes in fp32)."""
    world = torch.distributed.get_world_size()
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    ids = torch.randint(1, SMALL["vocab_size"], (2, 4 * world), generator=torch.Generator().manual_seed(1))
    ids[1, -3:] = 0  # right padding: the head reads token -4 of the second sequence
    for cls in (transformers.LlamaForSequenceClassification, transformers.LlamaModel):
        torch.manual_seed(0)
        dense = cls(config).double()
        model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=sp)
        what = f"{cls.__name__} tp={world} sp={sp}"
        outs = []
        for m in (dense, model):
            if cls is transformers.LlamaModel:  # a pooled-embedding loss, computed alike on every rank
                out = m(input_ids=ids, output_hidden_states=True)
                out.loss = out.last_hidden_state.mean(1).pow(2).sum()
            else:
                out = m(input_ids=ids, labels=torch.tensor([0, 2]), output_hidden_states=True)
                torch.testing.assert_close(
                    out.logits,
                    outs[0].logits if outs else out.logits,
                    **TOL,
                    msg=lambda msg: f"{what}: logits: {msg}",
                )
            out.loss.backward()
            outs.append(out)
        torch.testing.assert_close(outs[1].loss, outs[0].loss, **TOL, msg=lambda m: f"{what}: loss: {m}")
        for i, (h, ref) in enumerate(zip(outs[1].hidden_states, outs[0].hidden_states, strict=True)):
            torch.testing.assert_close(h, ref, **TOL, msg=lambda m: f"{what}: hidden state {i}: {m}")
        for e in layouts(model):
            ref_grad = e.layout.local_from_dense(dense.get_parameter(e.names[0]).grad)
            torch.testing.assert_close(
                e.tensor.grad, ref_grad, **TOL, msg=lambda m: f"{what}: grad {e.names}: {m}"
            )


@pytest.mark.parametrize("sp", [False, True])
def test_classification_head_and_base_model(sp):
    run_ranks(_heads, 2, sp)


def test_attention_norm_plans():
    """q/k norms inside attention, by the features their weight covers: all query or all key heads (OLMo2's
    RMSNorm, Cohere's weight per head) are sharded with those heads; any other size is named, not guessed."""
    config = transformers.Olmo2Config(**SMALL, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model = transformers.Olmo2ForCausalLM(config)
    plan = tpext.auto_plan(model)
    assert plan["model.layers.0.self_attn.q_norm"] == tpext.Style("colwise", (Piece(8, 8),))
    assert plan["model.layers.0.self_attn.k_norm"] == tpext.Style("colwise", (Piece(2, 8),))
    model.model.layers[1].self_attn.k_norm = type(model.model.layers[1].self_attn.k_norm)(24)
    plan = tpext.auto_plan(model)  # that attention is replicated whole, naming why
    assert plan["model.layers.1.self_attn"] == tpext.parallel.Replicate(full_sequence=True)
    assert (
        "k_norm (Olmo2RMSNorm with a weight of 24 features: neither one head's, nor all query or key heads')"
        in plan.sources["model.layers.1.self_attn"]
    )


def test_moe_plan():
    """A mixture-of-experts block: the experts sharded, the router and the shared expert's gate replicated, the
    shared expert an MLP; the dense first layer's MLP as any MLP."""
    plan = tpext.auto_plan(_model("qwen2_moe", 2, "sdpa"), sequence_parallel=True)
    layer = "model.layers.1.mlp"
    assert {name: style.kind for name, style in plan.items() if name.startswith(layer)} == {
        f"{layer}.gate": "replicate",
        f"{layer}.experts": "experts",
        f"{layer}.shared_expert_gate": "replicate",
        f"{layer}.shared_expert.gate_proj": "colwise",
        f"{layer}.shared_expert.up_proj": "colwise",
        f"{layer}.shared_expert.down_proj": "rowwise",
    }
    assert plan["model.layers.0.mlp.down_proj"].kind == "rowwise"


def test_zoo_plans():
    """BitNet's norms over sharded features are colwise (attn_sub_norm with the heads, ffn_sub_norm with the
    intermediate features); a router's children
    (HunYuan's gate.wg) are replicated with it; GPT-OSS's attention module (its sinks) is placed; a model
    computing its own loss (BART's decoder) gets gathered logits."""
    plan = tpext.auto_plan(_model("bitnet", 2, "eager"))
    assert plan["model.layers.0.mlp.ffn_sub_norm"] == tpext.Style("colwise", (Piece(96),))
    assert plan["model.layers.0.self_attn.attn_sub_norm"] == tpext.Style("colwise", (Piece(8, 8),))
    plan = tpext.auto_plan(_model("hunyuan_v1_moe", 2, "eager"))
    assert plan["model.layers.0.mlp.gate.wg"].kind == "replicate"
    plan = tpext.auto_plan(_model("gpt_oss", 2, "eager"))
    assert plan["model.layers.0.self_attn"].kind == "replicate"
    assert plan["lm_head"].gather_output is False
    assert tpext.auto_plan(_model("bart", 8, "eager"))["lm_head"].gather_output is True


def test_layouts_tpext_cannot_tell_are_refused():
    """Packed or nested attention weights whose head layout the names do not tell are named, not guessed,
    and their attention replicated whole: a packed qkv_proj beside an out_proj (not CodeGen's, whose blocks
    tpext knows) and StableLM's per-head norms in a list."""
    codegen = transformers.CodeGenForCausalLM(
        transformers.CodeGenConfig(
            n_embd=64, n_head=8, n_layer=1, rotary_dim=4, n_inner=96, n_positions=64, vocab_size=100
        )
    )
    codegen.transformer.h[0].attn.__class__ = type(
        "OtherAttention", (type(codegen.transformer.h[0].attn),), {}
    )
    plan = tpext.auto_plan(codegen)
    assert plan["transformer.h.0.attn"] == tpext.parallel.Replicate(full_sequence=True)
    assert (
        "qkv_proj (Linear: OtherAttention.qkv_proj: tpext knows a packed qkv_proj's layout"
        in plan.sources["transformer.h.0.attn"]
    )
    stablelm = transformers.StableLmForCausalLM(transformers.StableLmConfig(**SMALL, qk_layernorm=True))
    plan = tpext.auto_plan(stablelm)  # its attention is replicated whole, naming why
    assert plan["model.layers.0.self_attn"] == tpext.parallel.Replicate(full_sequence=True)
    assert (
        "q_layernorm.norms.0 (LayerNorm nested inside attention module model.layers.0.self_attn: tpext "
        "cannot tell" in plan.sources["model.layers.0.self_attn"]
    )


def _gptj_under_sp() -> list[str]:
    """GPT-J reshapes its decoder stack's output to the full sequence length: under SP that is an error at
    the first place tpext sees it, never a reinterpreted shard."""
    config = transformers.GPTJConfig(
        **SMALL, rotary_dim=4, n_inner=96, pad_token_id=0, eos_token_id=1, bos_token_id=1
    )
    ids = torch.zeros(8, 4, dtype=torch.long)  # 8 x 2 x 64 elements: the reshape to [-1, 4, 64] goes through
    messages = []
    for cls in (transformers.GPTJModel, transformers.GPTJForCausalLM):
        model = tpext.parallelize(cls(config), sequence_parallel=True)
        with pytest.raises(ValueError) as err:
            model(input_ids=ids)
        messages.append(str(err.value))
    return messages


def test_gptj_under_sequence_parallelism_is_an_error():
    base, causal = run_ranks(_gptj_under_sp, 2)[0]
    assert (
        "under sequence parallelism model must return its decoder stack's output shard (8, 2, 64) as "
        "last_hidden_state, got shape (4, 4, 64): the model reshapes it"
    ) in base, base
    assert "got (4, 4, 64) (a slice, as logits_to_keep or generation takes, or a reshape of it" in causal, (
        causal
    )


def _bart_under_sp() -> str:
    """BART's decoder registers layernorm_embedding after its layers but calls it before them: converted for
    sequence shards (its gradients summed over the group), it would see the whole sequence on every rank and
    its gradients would be counted once per rank. The first forward says so, before any backward."""
    model = tpext.parallelize(_model("bart", 8, "eager"), sequence_parallel=True)
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        model(input_ids=ids)
    return str(err.value)


def test_bart_under_sequence_parallelism_is_an_error():
    message = run_ranks(_bart_under_sp, 2)[0]
    assert message.startswith(
        "tpext.parallelize: model.decoder.layernorm_embedding runs before the sequence is "
        "split at model.decoder.layers.0"
    ), message
    assert "plan 'model.decoder.layernorm_embedding' as 'replicate'" in message, message


def _checkpoint_and_copy(arch: str, path: str) -> None:
    """Sharded q/k norm weights (OLMo2's, Cohere's) and 3-D expert weights (Qwen2-MoE's) gather back to the
    dense state dict bit for bit, load from the dense checkpoint into their slices, and survive
    copy.deepcopy: the dense logits every time."""
    world = torch.distributed.get_world_size()
    dense = _model(arch, 2, "sdpa")
    model = tpext.parallelize(copy.deepcopy(dense))
    state = tpext.gather_state_dict(model)
    for name, tensor in dense.state_dict().items():
        assert torch.equal(state[name], tensor), f"{arch} tp={world}: {name}"
    ids = torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        for p in model.parameters():
            p.fill_(1.0)
        tpext.load_checkpoint(model, path)
        for m in (model, copy.deepcopy(model)):
            logits = mappings.gather_from_tp(m(input_ids=ids).logits, SMALL["vocab_size"])
            torch.testing.assert_close(logits, ref, **TOL, msg=lambda msg: f"{arch} tp={world}: {msg}")


@pytest.mark.parametrize("arch", ["olmo2", "cohere", "qwen2_moe"])
def test_checkpoint_and_copy(tmp_path, arch):
    tpext.save_checkpoint(_model(arch, 2, "sdpa"), tmp_path / "dense.safetensors")
    run_ranks(_checkpoint_and_copy, 4, arch, str(tmp_path / "dense.safetensors"))


def _save_pretrained(path: str) -> None:
    """save_pretrained of a parallelized model writes the dense model (from global rank 0): its config with
    the dense head counts, and weights that from_pretrained loads into the dense model's."""
    tpext.parallelize(_model("qwen3", 2, "sdpa"), sequence_parallel=True).save_pretrained(path)


def test_save_pretrained_writes_the_dense_model(tmp_path):
    run_ranks(_save_pretrained, 4, str(tmp_path))
    dense = _model("qwen3", 2, "sdpa")
    loaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.num_attention_heads == 8 and loaded.config.num_key_value_heads == 2
    state = loaded.state_dict()
    assert state.keys() == dense.state_dict().keys()
    for name, tensor in dense.state_dict().items():
        assert torch.equal(state[name], tensor), name


def _gemma_padding() -> tuple:
    """Gemma's scaled embedding, vocab-parallel: padding_idx is this rank's row of the padding token (None
    where another rank holds it), so nn.Embedding's and Hugging Face's init zero that token's row only."""
    config = transformers.GemmaConfig(**SMALL, head_dim=8, num_key_value_heads=2, pad_token_id=60)
    model = tpext.parallelize(transformers.GemmaForCausalLM(config))
    emb = model.model.embed_tokens
    for init in (emb.reset_parameters, lambda: model._init_weights(emb)):
        with torch.no_grad():
            emb.weight.fill_(1.0)
        init()
        zero_rows = (emb.weight == 0).all(-1).nonzero().flatten().tolist()
        assert zero_rows == ([60 - emb.vocab_start] if emb.padding_idx is not None else []), zero_rows
    return emb.vocab_start, emb.padding_idx


def test_gemma_embedding_padding_row():
    assert run_ranks(_gemma_padding, 2) == [(0, None), (50, 10)]
