"""tpext.nn.functional.vocab_parallel_cross_entropy vs torch.nn.functional.cross_entropy (fp64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from dist import case_result, run_cases, run_ranks

from tpext.distributed import shard_range
from tpext.nn.functional import vocab_parallel_cross_entropy

f64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
WORLD_SIZES = [1, 2, 3, 4]
# (vocab, label smoothing, reduction); 13 does not divide. With smoothing, V is given (as a vocab-parallel
# lm_head knows it); without, it is found by all-reducing the shard widths.
CASES = list(itertools.product((16, 13), (0.0, 0.1), ("mean", "sum", "none")))


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(4, 5, vocab, generator=g, dtype=f64)
    target = torch.randint(0, vocab, (4, 5), generator=g)
    target[0, :2] = -100
    return g, logits, target


def _cross_entropy_case(vocab: int, smoothing: float, reduction: str) -> dict[str, tuple]:
    """{what: (tpext, dense reference)} for the loss and the gradient of this rank's logits."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    g, logits, target = _inputs(vocab)
    start, size = shard_range(vocab, world, rank)
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(
        full.view(-1, vocab),
        target.view(-1),
        ignore_index=-100,
        label_smoothing=smoothing,
        reduction=reduction,
    )
    ref = ref.view(4, 5) if reduction == "none" else ref
    dloss = torch.randn(ref.shape, generator=g, dtype=f64)
    (ref * dloss).sum().backward()
    shard = logits[..., start : start + size].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(
        shard, target, label_smoothing=smoothing, reduction=reduction, vocab_size=vocab if smoothing else None
    )
    (loss * dloss).sum().backward()
    return {"loss": (loss.detach(), ref.detach()), "grad": (shard.grad, full.grad[..., start : start + size])}


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"tp{w}")
def cross_entropy_results(request):
    return run_cases(_cross_entropy_case, request.param, CASES)


@pytest.mark.parametrize(
    "vocab, smoothing, reduction", CASES, ids=[f"V{v}-smoothing{s}-{r}" for v, s, r in CASES]
)
def test_vocab_parallel_cross_entropy_matches_dense(cross_entropy_results, vocab, smoothing, reduction):
    for rank, pairs in enumerate(case_result(cross_entropy_results, (vocab, smoothing, reduction))):
        for what, (got, want) in pairs.items():
            torch.testing.assert_close(
                got, want, **TOL, msg=lambda m, what=what, rank=rank: f"rank {rank} {what}: {m}"
            )


def _cross_entropy_errors() -> None:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    vocab = 13
    _, logits, target = _inputs(vocab)
    start, size = shard_range(vocab, world, rank)
    with pytest.raises(ValueError, match=r"target must be logits_shard.shape\[:-1\] = \(4, 5\), got \(4,\)"):
        vocab_parallel_cross_entropy(logits[..., :size], target[:, 0])
    if world > 1:
        with pytest.raises(
            ValueError,
            match=rf"rank {rank}'s shard of V = {vocab + world} over {world} ranks has "
            rf"{size + 1} logits, got {size}",
        ):
            vocab_parallel_cross_entropy(logits[..., :size], target, vocab_size=vocab + world)


@pytest.mark.parametrize("world_size", [1, 4])
def test_vocab_parallel_cross_entropy_errors_are_named(world_size):
    run_ranks(_cross_entropy_errors, world_size)
