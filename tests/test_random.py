"""tpext.random: the model-parallel seed and the RNG tracker's fork."""

from __future__ import annotations

import pytest
import torch
from checks import lm_inputs, tiny_hf_model
from dist import CaseBatches, run_ranks

import tpext


def _rng_draws() -> tuple:
    tpext.random.model_parallel_seed(1234)
    replicated = torch.rand(4)
    with tpext.random.get_rng_tracker().fork():
        tp = torch.nn.functional.dropout(torch.ones(8), 0.5)
    after = torch.rand(4)  # the fork left the default stream where it was
    tpext.random.model_parallel_seed(1234)
    again = torch.rand(4)
    return replicated, tp, after, again


def test_rng_tracker():
    r0, r1 = run_ranks(_rng_draws, 2)
    assert torch.equal(r0[0], r1[0]) and torch.equal(r0[2], r1[2])  # replicated regions agree
    assert not torch.equal(r0[1], r1[1])  # TP regions differ per rank
    assert torch.equal(r0[0], r0[3])  # reproducible
    torch.manual_seed(1234)
    first, second = torch.rand(4), torch.rand(4)
    assert torch.equal(r0[0], first) and torch.equal(r0[2], second)


# (seeds: "alike" or "by rank", training mode, dropout probability) -> whether the first forward raises.
_RNG_CASES = {
    ("alike", True, 0.1): False,
    ("by rank", True, 0.1): True,  # replicated activations would get a different mask on each rank
    ("by rank", False, 0.1): False,  # eval: no mask drawn
    ("by rank", True, 0.0): False,  # no dropout: nothing drawn, nothing to agree on
}


def _parallelized_dropout(seeds: str, training: bool, p: float) -> tuple[str, float]:
    """A GPT-2 (dropout p everywhere) parallelized at tp 2 and run twice after seeding the default generator
    as `seeds` says: ("ok", the largest difference of its hidden states across ranks) or ("raised", message)."""
    import torch.distributed as dist

    settings = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    settings.update(resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
    model = tpext.parallelize(tiny_hf_model("GPT2Config", "GPT2Model", settings, torch.float32))
    model.train(training)
    torch.manual_seed(1 + (dist.get_rank() if seeds == "by rank" else 0))
    ids, _ = lm_inputs(64, 2, 8)
    try:
        spread = 0.0
        for _ in range(2):
            hidden = model(ids).last_hidden_state.detach()
            gathered = [torch.empty_like(hidden) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, hidden)
            spread = max(spread, max((g - hidden).abs().max().item() for g in gathered))
    except ValueError as exc:
        return "raised", str(exc)
    return "ok", spread


rng_batches = CaseBatches.fixture(_parallelized_dropout, {2: list(_RNG_CASES)})


@pytest.mark.parametrize(("seeds", "training", "p"), list(_RNG_CASES), ids=lambda v: str(v).replace(" ", "-"))
def test_dropout_needs_the_same_rng_state_on_every_rank(rng_batches, seeds, training, p):
    """Dropout in a parallelized model draws from the default generators: seeded alike, every rank gets the
    same replicated activations; seeded by rank, the first training forward that draws a mask raises."""
    for status, value in rng_batches.result(2, (seeds, training, p)):
        if _RNG_CASES[(seeds, training, p)]:
            assert status == "raised", value
            assert "differ across the ranks" in value and "model_parallel_seed" in value, value
        else:
            assert status == "ok" and value == 0.0, value
