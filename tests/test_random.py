"""tpext.random: the model-parallel seed and the RNG tracker's fork."""

from __future__ import annotations

import torch
from dist import run_ranks

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
