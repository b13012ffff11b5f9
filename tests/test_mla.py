"""Multi-head latent attention (DeepSeek-V2/V3's MLA) under plan="auto", with and without sequence parallelism:
logits, loss and every parameter gradient against the dense model (fp64, tp 2 and 4)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as tdist
from checks import assert_lm_matches, collectives_under, lm_inputs, lm_step, tiny_hf_model
from dist import case_result, cases_fixture, run_ranks, sp_ids
from model_census import TINY_HF

import tpext
from tpext.parallel import Colwise, Replicate, Rowwise
from tpext.parallel.mla import MLAKvAProj
from tpext.sharding import Piece

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-6)  # fp64 models; Hugging Face's loss and norms compute in fp32
VOCAB, BATCH, SEQ = TINY_HF["vocab_size"], 2, 8  # SEQ divisible by every world size (SP splits it)
# 8 heads of query / key 8 + 4 (nope + rope) and value 6 features; latents of 24 (q) and 16 (kv) features.
MLA = dict(
    TINY_HF,
    num_hidden_layers=2,
    num_key_value_heads=8,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
)
# (family, variant): DeepSeek-V3 with q's low-rank projections (q_a_proj, q_b_proj), its second layer a
# mixture of experts; DeepSeek-V2 with one q_proj (q_lora_rank=None) beside the kv latent, both layers MoE.
ARCHS = {
    "deepseek_v3-q_lora": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(first_k_dense_replace=1, n_group=2, topk_group=1),
    ),
    "deepseek_v2-q_proj": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(q_lora_rank=None)),
}
CASES = list(itertools.product(sorted(ARCHS), (False, True)))  # (arch, sequence_parallel)
WORLD_SIZES = [2, 4]


def _model(arch: str) -> torch.nn.Module:
    """The tiny dense model, fp64, every weight moved off its init, the same on every rank."""
    config_name, model_name, extra = ARCHS[arch]
    return tiny_hf_model(config_name, model_name, {**MLA, **extra})


def _compare(arch: str, sp: bool) -> int:
    """Asserts logits, loss and every parameter gradient of the tensor-parallel model equal the dense one's
    (this rank's slice, by its layout). Returns how many gradients were compared."""
    dense = _model(arch)
    model = tpext.parallelize(copy.deepcopy(dense), plan="auto", sequence_parallel=sp)
    ids, labels = lm_inputs(VOCAB, BATCH, SEQ)
    ref, out = lm_step(dense, input_ids=ids, labels=labels), lm_step(model, input_ids=ids, labels=labels)
    return assert_lm_matches(model, dense, out, ref, f"{arch} tp={tdist.get_world_size()} sp={sp}", **TOL)


mla_results = cases_fixture(_compare, CASES, WORLD_SIZES, timeout_s=300.0)


@pytest.mark.slow
@pytest.mark.parametrize("arch, sp", CASES, ids=sp_ids(CASES))
def test_mla_matches_dense(mla_results, arch, sp):
    """Logits, loss and every parameter gradient (q/kv down projections and their norms replicated, the up
    projections and o_proj by heads, the shared rotary key's gradient summed) against the dense model."""
    compared = case_result(mla_results, (arch, sp))
    assert compared[0] > 20 and len(set(compared)) == 1, compared


def test_auto_plan_reads_mla_heads():
    """q_b_proj by heads of 8 + 4 features, kv_b_proj of 8 + 6, o_proj of 6; the down projections and their
    norms replicated; kv_a_proj_with_mqa from Hugging Face's 'mla_kv_a_proj', with its 4 rotary features."""
    plan = tpext.auto_plan(_model("deepseek_v3-q_lora"))
    attn = "model.layers.0.self_attn."
    assert plan[attn + "q_b_proj"] == Colwise((Piece(8, 12),))
    assert plan[attn + "kv_b_proj"] == Colwise((Piece(8, 14),))
    assert plan[attn + "o_proj"] == Rowwise((Piece(8, 6),))
    for leaf in ("q_a_proj", "q_a_layernorm", "kv_a_layernorm"):
        assert plan[attn + leaf] == Replicate(), leaf
    assert plan[attn + "kv_a_proj_with_mqa"] == MLAKvAProj(4)
    v2 = tpext.auto_plan(_model("deepseek_v2-q_proj"))
    assert v2[attn + "q_proj"] == Colwise((Piece(8, 12),))
    assert v2[attn + "kv_a_proj_with_mqa"] == MLAKvAProj(4)
    assert "'mla_kv_a_proj'" in v2.sources[attn + "kv_a_proj_with_mqa"], v2.sources


def _replicated_kv_a_refused() -> str:
    model = _model("deepseek_v3-q_lora")
    plan = tpext.auto_plan(model)
    plan = {k: Replicate() if k.endswith("kv_a_proj_with_mqa") else v for k, v in plan.items()}
    with pytest.raises(ValueError) as err:
        tpext.parallelize(model, plan=plan)
    assert not any(vars(m).get("_tpext_layouts") for m in model.modules()), "the model was changed"
    return str(err.value)


def test_replicated_kv_a_proj_is_refused():
    """A plan that shards the heads but replicates kv_a_proj_with_mqa as it is would leave the shared rotary
    key's gradient partial: refused, naming the module and the way out."""
    message = run_ranks(_replicated_kv_a_refused, 2)[0]
    assert message.startswith("tpext.parallelize: model.layers.0.self_attn.kv_a_proj_with_mqa (Linear)"), (
        message
    )
    assert "MLAKvAProj(qk_rope_head_dim)" in message, message


def _attention_collectives(sp: bool) -> list[tuple[str, str, str, int]]:
    """(phase, collective, module, bytes) of the first layer's attention, one forward and backward."""
    model = tpext.parallelize(_model("deepseek_v3-q_lora"), sequence_parallel=sp)
    ids, labels = lm_inputs(VOCAB, BATCH, SEQ)
    return collectives_under(model, "model.layers.0.self_attn", input_ids=ids, labels=labels)


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_mla_collectives(sp):
    """One forward and backward of an MLA attention at tp 2: o_proj's all-reduce (or its reduce-scatter and the
    gather under SP), and backward the all-reduces of the latents' gradients (q: 24, kv: 16 features) and of
    the shared rotary key's (4), never of the hidden states' ([2, 8, 64] fp64: 8192 bytes). Under SP the
    gathered sequence's gradient is not reduce-scattered: only replicated down projections read it."""
    latents = [
        ("backward", "all_reduce", "kv_a_proj_with_mqa", 2 * 8 * 4 * 8),
        ("backward", "all_reduce", "kv_b_proj", 2 * 8 * 16 * 8),
        ("backward", "all_reduce", "q_b_proj", 2 * 8 * 24 * 8),
    ]
    hidden = 2 * 8 * 64 * 8
    if sp:
        want = [
            ("backward", "all_gather", "o_proj", hidden),
            *latents,
            ("forward", "all_gather", "gather", hidden),
            ("forward", "reduce_scatter", "o_proj", hidden),
        ]
    else:
        want = [*latents, ("forward", "all_reduce", "o_proj", hidden)]
    got = run_ranks(_attention_collectives, 2, sp)
    assert got[0] == sorted(want) and got[1] == got[0], got
