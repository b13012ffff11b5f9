"""Mixture-of-experts blocks under sequence parallelism vs the dense model (fp64), at tp 2 and 4.

A block whose output is a sum of its experts' and shared expert's outputs (times replicated factors: Qwen2-MoE's
sigmoid gate) runs on the gathered sequence with every rank's partial sum reduce-scattered once at its output:
tpext.comm_stats shows one all-gather and one reduce-scatter per block in forward and no all-reduce inside it.
Checked on Hugging Face's Mixtral, Qwen2-MoE (shared expert and its gate), Qwen3-MoE, OLMoE, GPT-OSS (expert
biases, a router with a bias) and Llama 4 (shared expert, flattened output, routed tokens only), with the
router's load-balancing loss in the loss (its gradient enters the block through the router logits): logits,
loss and every parameter gradient (the router's and the gate's included). A block with something nonlinear
after the sum, or a residual inside it, falls back to its experts' own all-reduce and still matches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_grads_match
from dist import run_cases

import tpext
from tpext import mappings

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 64, 8
TOL = {"rtol": 1e-5, "atol": 1e-7}  # fp64, but Hugging Face's norms compute in fp32
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
_MOE = dict(output_router_logits=True, router_aux_loss_coef=0.5, num_experts_per_tok=2)
# family: (config class, model class, settings); every block but qwen2_moe's first (dense) is an MoE block
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**_MOE, "num_local_experts": 4}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**_MOE, "num_experts": 4, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_MOE, "num_experts": 4, "moe_intermediate_size": 16},
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {**_MOE, "num_experts": 4}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {**_MOE, "num_local_experts": 4}),
    "llama4_text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {**_MOE, "num_local_experts": 4, "intermediate_size_mlp": 64},
    ),
}


def _model(family: str) -> torch.nn.Module:
    config_name, model_name, settings = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**_SMALL, **settings}, attn_implementation="eager")
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every weight away from its init (zero biases, ones in norms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _moe_blocks(model: torch.nn.Module) -> list[str]:
    return [name.rpartition(".")[0] for name, _ in model.named_modules() if name.endswith(".experts")]


def _run(model: torch.nn.Module, record: bool):
    ids = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.2, -100)
    with tpext.comm_stats() as stats:
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
    return out, stats


def _compare(family: str, wrap=None) -> dict:
    """Logits, loss and every gradient of `family` under SP vs dense; returns, per MoE block, its forward
    collectives {kind: count} and their bytes."""
    dense = _model(family)
    if wrap is not None:
        wrap(dense)
    model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=True)
    ref, _ = _run(dense, False)
    out, stats = _run(model, True)
    world = torch.distributed.get_world_size()
    what = f"{family} tp={world}"
    logits = out.logits if out.logits.shape[-1] == VOCAB else mappings.gather_from_tp(out.logits, VOCAB)
    torch.testing.assert_close(logits, ref.logits, **TOL, msg=lambda m: f"{what}: logits: {m}")
    torch.testing.assert_close(out.loss, ref.loss, **TOL, msg=lambda m: f"{what}: loss: {m}")
    assert_grads_match(model, dense, what, **TOL)
    counts = {}
    for block in _moe_blocks(dense):
        inside = [r for r in stats.records if r.phase == "forward" and r.module.startswith(block + ".")]
        kinds = sorted(r.kind for r in inside)
        counts[block] = (kinds, sum(r.nbytes for r in inside))
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_moe_blocks_reduce_once_under_sp(world):
    cases = [(family,) for family in FAMILIES]
    results = run_cases(_compare, world, cases, timeout_s=600)
    for case in cases:
        per_rank = results[case]
        assert all(status == "ok" for status, _ in per_rank), next(v for s, v in per_rank if s != "ok")
        counts = per_rank[0][1]
        assert counts, case
        for block, (kinds, _) in counts.items():
            assert kinds == ["all_gather", "reduce_scatter"], f"{case} tp={world}: {block}: {kinds}"


def _nonlinear_after_sum(model: torch.nn.Module) -> None:
    for name in _moe_blocks(model):
        block = model.get_submodule(name)
        block.register_forward_hook(lambda m, args, out: torch.tanh(out))


def _residual_inside(model: torch.nn.Module) -> None:
    for name in _moe_blocks(model):
        block = model.get_submodule(name)
        block.register_forward_hook(lambda m, args, out: out + args[0])


_WRAPS = {"tanh": _nonlinear_after_sum, "residual": _residual_inside}


def _fallback(family: str, wrap: str) -> dict:
    return _compare(family, _WRAPS[wrap])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_block_not_a_sum_falls_back(world):
    cases = [(family, wrap) for family in ("qwen2_moe", "mixtral") for wrap in _WRAPS]
    results = run_cases(_fallback, world, cases, timeout_s=600)
    for case in cases:
        per_rank = results[case]
        assert all(status == "ok" for status, _ in per_rank), next(v for s, v in per_rank if s != "ok")
        for block, (kinds, _) in per_rank[0][1].items():
            # its experts (and shared expert) all-reduce their own outputs; the output is split, not reduced
            assert "all_reduce" in kinds and "reduce_scatter" not in kinds, f"{case}: {block}: {kinds}"


def _meta_partial(limit: int) -> bool:
    """Whether Qwen2-MoE's block, built on the meta device, reduces once (its shared expert's column layer
    then takes the gathered sequence as sequence-parallel) when a meta block of up to `limit` weights is
    probed."""
    import tpext.parallel.full_sequence as full_sequence

    config_name, model_name, settings = FAMILIES["qwen2_moe"]
    config = getattr(transformers, config_name)(**{**_SMALL, **settings}, attn_implementation="eager")
    with torch.device("meta"):
        model = getattr(transformers, model_name)(config)
    before, full_sequence._META_PROBE_LIMIT = full_sequence._META_PROBE_LIMIT, limit
    try:
        tpext.parallelize(model, sequence_parallel=True)
    finally:
        full_sequence._META_PROBE_LIMIT = before
    return model.model.layers[0].mlp.shared_expert.gate_proj.sequence_parallel


def test_meta_block_probed_only_up_to_its_limit():
    """A block on meta is probed on a CPU copy only up to the size limit; past it, it keeps the all-reduce."""
    cases = [(1 << 26,), (16,)]
    results = run_cases(_meta_partial, 2, cases, timeout_s=300)
    assert [results[c][0] for c in cases] == [("ok", True), ("ok", False)], results
