"""Each of tpext's communication Functions (mappings) and the vocab-parallel cross entropy, alone in a
torch.compile(fullgraph=True) graph: the same output and the same input gradient as eager.

The case this guards: torch 2.11's dynamo adds every intermediate of an autograd.Function's forward to the
traced Function's outputs, and an intermediate that is the returned tensor itself (a buffer written in
place by a collective, a no-op contiguous() or to()) takes that output's place in autograd: the input
gradient comes back as zeros, silently (mappings.new_output has the details).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from dist import run_ranks

from tpext import mappings
from tpext.nn.functional import vocab_parallel_cross_entropy

f64 = torch.float64
TARGET = torch.tensor([[0, 5, 7, 11], [3, 6, 1, 8], [11, 0, 2, 9], [4, 4, 10, 6]])  # ids in V = 12

CASES = {
    "copy_to_tp": lambda x: mappings.copy_to_tp(x),
    "reduce_from_tp": lambda x: mappings.reduce_from_tp(x),
    "scatter_to_sequence": lambda x: mappings.scatter_to_sequence(x),
    "scatter_to_sequence dim 1": lambda x: mappings.scatter_to_sequence(x, dim=1),
    "gather_from_sequence": lambda x: mappings.gather_from_sequence(x),
    "gather_from_sequence replicated_grad": lambda x: mappings.gather_from_sequence(x, replicated_grad=True),
    "reduce_scatter_to_sequence": lambda x: mappings.reduce_scatter_to_sequence(x),
    "reduce_scatter_to_sequence dim 1": lambda x: mappings.reduce_scatter_to_sequence(x, dim=1),
    "scatter_to_tp": lambda x: mappings.scatter_to_tp(x),
    "scatter_to_tp one row": lambda x: mappings.scatter_to_tp(x[:1, :1]),  # a contiguous shard of [1, 1, 6]
    "gather_from_tp": lambda x: mappings.gather_from_tp(x, 12),
    "vocab_parallel_cross_entropy": lambda x: vocab_parallel_cross_entropy(
        x, TARGET, vocab_size=12, reduction="none"
    ),
}


def _check(backend: str) -> list[str]:
    rank = tdist.get_rank()
    wrong = []
    for name, fn in CASES.items():
        # [4, 4, 6]: sequence 4 (divisible by 2), last dim 6 = this rank's shard of 12 at tp 2.
        x = torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(rank), dtype=f64)
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager = fn(x_eager)
        dy = torch.randn(y_eager.shape, generator=torch.Generator().manual_seed(10 + rank), dtype=f64)
        y_eager.backward(dy)
        torch._dynamo.reset()
        y_compiled = torch.compile(fn, backend=backend, fullgraph=True)(x_compiled)
        y_compiled.backward(dy)
        if not torch.equal(y_compiled, y_eager):
            wrong.append(f"{name}: output")
        if not torch.allclose(x_compiled.grad, x_eager.grad, rtol=1e-12, atol=1e-12):
            wrong.append(
                f"{name}: input gradient (max |compiled - eager| "
                f"{(x_compiled.grad - x_eager.grad).abs().max().item():.3g})"
            )
    return wrong


def test_compiled_functions_give_eager_gradients():
    # aot_eager: dynamo and AOTAutograd, where the gradients were lost, without inductor's compile time.
    for rank, wrong in enumerate(run_ranks(_check, 2, "aot_eager", timeout_s=600)):
        assert not wrong, f"torch {torch.__version__}, rank {rank}: compiled differs from eager: {wrong}"
