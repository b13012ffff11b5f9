"""VocabParallelEmbedding vs dense torch.nn.Embedding (fp64, every world size)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as tdist
from dist import case_result, run_cases, run_ranks

from tpext.distributed import shard_range
from tpext.nn import VocabParallelEmbedding

f64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
WORLD_SIZES = [1, 2, 3, 4]
CASES = list(itertools.product((12, 11), (False, True)))  # (vocab, sequence_parallel); 11 does not divide


def _embedding_case(vocab: int, sp: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{what: (tpext, dense reference)} for the output and the weight gradient on this rank."""
    rank, world = tdist.get_rank(), tdist.get_world_size()
    torch.manual_seed(vocab)
    dense = torch.nn.Embedding(vocab, 5, padding_idx=3, dtype=f64)
    ids = torch.randint(0, vocab, (2 * world, 3))
    ids[0, 0] = 3
    dy = torch.randn(2 * world, 3, 5, dtype=f64)
    y_ref = dense(ids)
    (y_ref * dy).sum().backward()

    layer = VocabParallelEmbedding.from_dense(dense, sequence_parallel=sp)
    y = layer(ids)
    rows = slice(rank * 2, rank * 2 + 2)
    (y * (dy[rows] if sp else dy)).sum().backward()
    start, size = shard_range(vocab, world, rank)
    return {
        "output": (y.detach(), (y_ref[rows] if sp else y_ref).detach()),
        "grad_w": (layer.weight.grad, dense.weight.grad[start : start + size]),
    }


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"tp{w}")
def embedding_results(request):
    return run_cases(_embedding_case, request.param, CASES)


@pytest.mark.parametrize("vocab, sp", CASES, ids=[f"V{v}-{'sp' if sp else 'nosp'}" for v, sp in CASES])
def test_vocab_parallel_embedding_matches_dense(embedding_results, vocab, sp):
    for rank, pairs in enumerate(case_result(embedding_results, (vocab, sp))):
        for what, (got, want) in pairs.items():
            torch.testing.assert_close(
                got, want, **TOL, msg=lambda m, what=what, rank=rank: f"rank {rank} {what}: {m}"
            )


def _out_of_range_ids() -> None:
    with pytest.raises(IndexError, match=r"ids must be in \[0, 12\), got min 0 max 12"):
        VocabParallelEmbedding(12, 5)(torch.tensor([0, 12]))


def test_out_of_range_ids_are_named():
    run_ranks(_out_of_range_ids, 2)
