"""Sequence parallelism on Hugging Face models whose attention has column layers besides q/k/v that read its
input (Beam's gate_proj, Laguna's g_proj: a gate per head), vs the dense model: logits, loss and every
parameter gradient, at tp 2 and 4. And a model whose own code after the decoder layers expects the full
sequence (GPT-BigCode views their output as [batch, sequence, hidden]): refused at the first forward with a
tpext.parallelize error naming the module, not the model's shape error."""

from __future__ import annotations

import pytest
import torch
from checks import assert_grads_match
from dist import run_cases

import tpext
from tpext import mappings

pytest.importorskip("transformers")

import model_census  # noqa: E402  (needs transformers)

TOL = {"rtol": 1e-4, "atol": 1e-5}  # Hugging Face's norms compute in fp32


def _build(family: str) -> torch.nn.Module:
    try:
        return model_census.build(family)
    except Exception:  # noqa: BLE001 - a family that does not run in fp64 (Beam) is built in fp32
        return model_census.build(family, torch.float32)


def _run(model: torch.nn.Module):
    ids, labels = model_census.inputs()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out


def _compare(family: str) -> None:
    dense = _build(family)
    model = _build(family).to(next(dense.parameters()).dtype)
    model.load_state_dict(dense.state_dict())
    tpext.parallelize(model, sequence_parallel=True)
    ref, out = _run(dense), _run(model)
    what = f"{family} tp={torch.distributed.get_world_size()}"
    vocab = ref.logits.shape[-1]
    logits = out.logits if out.logits.shape[-1] == vocab else mappings.gather_from_tp(out.logits, vocab)
    torch.testing.assert_close(logits, ref.logits, **TOL, msg=lambda m: f"{what}: logits: {m}")
    torch.testing.assert_close(out.loss, ref.loss, **TOL, msg=lambda m: f"{what}: loss: {m}")
    assert_grads_match(model, dense, what, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("family", ["beam", "laguna"])
def test_attention_gates_under_sp(family, world):
    results = run_cases(_compare, world, [(family,)], timeout_s=600)
    for status, value in results[(family,)]:
        assert status == "ok", value


def _refused(family: str) -> str:
    model = _build(family)
    tpext.parallelize(model, sequence_parallel=True)
    with pytest.raises(ValueError) as err:
        _run(model)
    return str(err.value)


@pytest.mark.slow
def test_full_sequence_after_the_stack_is_refused():
    results = run_cases(_refused, 2, [("gpt_bigcode",)], timeout_s=600)
    for status, message in results[("gpt_bigcode",)]:
        assert status == "ok", message
        assert message.startswith(
            "tpext.parallelize: under sequence parallelism the code of transformer (GPTBigCodeModel) after its "
            "decoder layers expects the full sequence, not their output shard (2, 4, 64); parallelize it with "
            "sequence_parallel=False"
        ), message
