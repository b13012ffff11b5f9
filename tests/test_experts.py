"""tpext.nn.shard_experts: a mixture-of-experts module with 3-D weights, every expert's intermediate features
sharded, vs the dense module (fp64): its output and the gradients of the tokens, of the routing weights and
of every weight, for each layout Hugging Face's experts declare ([gate; up] or interleaved rows, transposed
or not), with a forward that reads its intermediate size, at world sizes 1, 2 and 3; and the modules it
must refuse, each with its reason."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpext
from dist import run_ranks
from tpext.sharding import layouts

E, H, I, TOKENS, TOP_K = 5, 8, 12, 9, 2


class Experts(nn.Module):
    """The eager loop of Hugging Face's experts, for any of their weight layouts."""

    def __init__(self, *, transposed: bool = False, concatenated: bool = True, across_features: bool = False):
        super().__init__()
        self.num_experts, self.is_transposed, self.is_concatenated = E, transposed, concatenated
        self.intermediate_dim = I  # splits gate from up: tpext sets this rank's
        self.across_features = across_features  # normalise the intermediate features: not shardable
        gen = torch.Generator().manual_seed(0)
        up, down = ((E, H, 2 * I), (E, I, H)) if transposed else ((E, 2 * I, H), (E, H, I))
        self.gate_up_proj = nn.Parameter(torch.randn(up, generator=gen, dtype=torch.float64) / H ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(down, generator=gen, dtype=torch.float64) / I ** 0.5)

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            up, down = self.gate_up_proj[e], self.down_proj[e]
            gate_up = x[token] @ (up if self.is_transposed else up.T)
            if self.is_concatenated:
                gate, up = gate_up[:, :self.intermediate_dim], gate_up[:, self.intermediate_dim:]
            else:
                gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
            h = F.silu(gate) * up
            if self.across_features:
                h = h - h.mean(-1, keepdim=True)
            y = h @ (down if self.is_transposed else down.T)
            out = out.index_add(0, token, y * top_k_weights[token, slot, None])
        return out


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, H, generator=gen, dtype=torch.float64)
    index = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOP_K, generator=gen, dtype=torch.float64)
    return x, index, weights


def _matches_dense() -> None:
    world = torch.distributed.get_world_size()
    for transposed in (False, True):
        for concatenated in (False, True):
            dense = Experts(transposed=transposed, concatenated=concatenated)
            sharded = tpext.nn.shard_experts(copy.deepcopy(dense), None)
            what = f"tp={world} transposed={transposed} concatenated={concatenated}"
            grads = []
            for module in (dense, sharded):
                x, index, weights = (t.requires_grad_(t.is_floating_point()) for t in _inputs())
                out = module(x, index, weights)
                (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
                grads.append((out, x.grad, weights.grad))
            for name, got, want in zip(("output", "token grads", "routing weight grads"), grads[1], grads[0]):
                torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {name}: {m}")
            for e in layouts(sharded):
                want = e.layout.local_from_dense(dense.get_parameter(e.names[0]).grad)
                torch.testing.assert_close(e.tensor.grad, want, msg=lambda m: f"{what}: grad {e.names}: {m}")
                if world > 1:
                    assert e.layout.is_sharded and e.tensor.shape != e.layout.dense_shape, what


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_experts_match_dense(world):
    run_ranks(_matches_dense, world)


def _refusals() -> list[str]:
    messages = []
    with_bias = Experts()
    with_bias.down_proj_bias = nn.Parameter(torch.zeros(E, H))
    modules = [Experts(across_features=True), with_bias, nn.Linear(4, 4)]
    uneven = Experts()
    uneven.gate_up_proj = nn.Parameter(torch.zeros(E, 14, H))
    uneven.down_proj = nn.Parameter(torch.zeros(E, H, 7))
    grouped_mm = Experts().float()  # 6 fp32 features a rank: 24-byte rows
    grouped_mm.config = types.SimpleNamespace(_experts_implementation="grouped_mm")
    for module in modules + [uneven, grouped_mm]:
        with pytest.raises(ValueError) as err:
            tpext.nn.shard_experts(module, None)
        messages.append(str(err.value))
    return messages


def test_refusals():
    across, bias, linear, uneven, grouped_mm = run_ranks(_refusals, 2)[0]
    assert ("cannot shard Experts: its outputs on slices of every expert's intermediate features do not add up to "
            "its output (they differ); give it the style 'replicate'") in across, across
    assert "besides ['down_proj', 'gate_up_proj'] it has ['down_proj_bias'], which tpext does not slice" in bias, bias
    assert "cannot shard Linear as experts: it needs 3-D down_proj and gate_up_proj (or up_proj)" in linear, linear
    assert "its experts' intermediate size 7 is not divisible by 2" in uneven, uneven
    assert ("with experts_implementation='grouped_mm': it needs rows of a multiple of 16 bytes, and this rank's 6 "
            "intermediate features of torch.float32 make 24") in grouped_mm, grouped_mm
