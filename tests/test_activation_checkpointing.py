"""Activation checkpointing (Hugging Face's gradient_checkpointing_enable) on a parallelized model: the
recomputed decoder layers run tpext's hooks and collectives again, and the gradients stay the dense ones."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from checks import assert_lm_matches, lm_inputs, lm_step, tiny_hf_model
from dist import SMALL_LLAMA, CaseBatches, run_ranks

import tpext

_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
)
_FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, _MOE),
}
_CASES = {
    2: [
        (family, sp, reentrant) for family in _FAMILIES for sp in (False, True) for reentrant in (False, True)
    ],
}


def _model(family: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = _FAMILIES[family]
    return tiny_hf_model(config_cls, model_cls, {**SMALL_LLAMA, **extra, **overrides})


def _step(model: torch.nn.Module, reentrant: bool | None):
    """`lm_step` in training mode, checkpointing every decoder layer unless `reentrant` is None."""
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids, labels = lm_inputs(SMALL_LLAMA["vocab_size"], 2, 8)
    return lm_step(model, input_ids=ids, labels=labels)


def _against_dense(family: str, sp: bool, reentrant: bool) -> int:
    """Both checkpointed: the parallelized model's logits, loss and every gradient against the dense model's."""
    dense = _model(family)
    model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=sp)
    out, ref = _step(model, reentrant), _step(dense, reentrant)
    return assert_lm_matches(
        model, dense, out, ref, f"{family} sp={sp} reentrant={reentrant}", rtol=1e-5, atol=1e-6
    )


def _case_id(family: str, sp: bool, reentrant: bool) -> str:
    return f"{family}-{'sp' if sp else 'no-sp'}-{'reentrant' if reentrant else 'non-reentrant'}"


batches = CaseBatches.fixture(_against_dense, _CASES)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "case"),
    CaseBatches.pairs(_CASES),
    ids=lambda v: _case_id(*v) if isinstance(v, tuple) else f"tp{v}",
)
def test_checkpointed_layers_keep_the_dense_gradients(batches, world, case):
    assert all(n > 10 for n in batches.result(world, case))  # every rank compared its gradients


def _dropout_recomputed(sp: bool) -> float:
    """With dropout, a checkpointed parallelized model replays each layer's masks in its recompute: its
    gradients equal the same model's without checkpointing (the dense model draws other masks)."""
    grads = []
    for reentrant in (None, False):
        model = tpext.parallelize(_model("llama", attention_dropout=0.3), sequence_parallel=sp)
        _step(model, reentrant)
        grads.append([p.grad for p in model.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*grads))


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_dropout_masks_replayed_in_the_recompute(sp):
    assert run_ranks(_dropout_recomputed, 2, sp) == [0.0, 0.0]
