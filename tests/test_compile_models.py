"""torch.compile(fullgraph=True) of a parallelized model: one graph, no break, same numbers as eager.

tpext's Llama and Hugging Face's Llama and OLMo2 at tp 2 with sequence parallelism (the split and
gather hooks, the shared q/k/v input, the overlapped ops, the vocab-parallel loss, OLMo2's q/k norms over
the group): logits, loss and every parameter gradient of the compiled model against the eager one, fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from dist import SMALL_LLAMA, run_ranks

import tpext
from tpext.models import LlamaConfig, LlamaForCausalLM

TOL = dict(rtol=1e-5, atol=1e-6)
SMALL = SMALL_LLAMA


def _check(kind: str) -> None:
    world = dist.get_world_size()
    torch.manual_seed(0)
    if kind == "tpext":
        dense = LlamaForCausalLM(LlamaConfig(**SMALL), dtype=torch.float32)
    else:
        transformers = pytest.importorskip("transformers")
        config_cls, model_cls = {
            "hf": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
        }[kind]
        config = config_cls(
            **SMALL, use_cache=False, max_position_embeddings=64, pad_token_id=0, eos_token_id=1
        )
        dense = model_cls(config).float()
    eager = tpext.parallelize(dense, sequence_parallel=True)
    compiled_model = copy.deepcopy(eager)
    ids = torch.randint(0, 100, (2, 4 * world), generator=torch.Generator().manual_seed(1))

    def step(model):
        if kind == "tpext":
            logits = model(ids)
            return logits, eager.loss(logits, ids)
        out = model(input_ids=ids, labels=ids)
        return out.logits, out.loss

    torch._dynamo.reset()
    logits, loss = step(torch.compile(compiled_model, fullgraph=True))
    loss.backward()
    ref_logits, ref_loss = step(eager)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(
            p.grad, q.grad, **TOL, msg=lambda m, name=name: f"{kind}: grad {name}: {m}"
        )


@pytest.mark.parametrize("kind", ["tpext", "hf", "olmo2"])
def test_compiled_model_fullgraph(kind):
    run_ranks(_check, 2, kind, timeout_s=600)
