"""tpext.nn.shard_experts: a mixture-of-experts module with 3-D weights, every expert's intermediate features
sharded, vs the dense module (fp64): its output and the gradients of the tokens, of the routing weights and
of every weight, for each layout Hugging Face's experts declare ([gate; up] or interleaved rows, transposed
or not), with a forward that reads its intermediate size, with expert biases (the down bias added once),
at world sizes 1, 2 and 3; Hugging Face's own experts modules (GPT-OSS: biases, interleaved gate/up,
transposed; Llama 4: routed tokens only, layout read from the shapes; PhiMoE, Ernie-4.5-MoE, HunYuan-MoE);
and the modules it must refuse, each with its reason."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from dist import run_ranks
from torch import nn

import tpext
from tpext.sharding import layouts

E, H, I, TOKENS, TOP_K = 5, 8, 12, 9, 2  # noqa: E741  (I: the intermediate size, as in the formulas)


class Experts(nn.Module):
    """The eager loop of Hugging Face's experts, for any of their weight layouts."""

    def __init__(
        self,
        *,
        transposed: bool = False,
        concatenated: bool = True,
        across_features: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.num_experts, self.is_transposed, self.is_concatenated = E, transposed, concatenated
        self.intermediate_dim = I  # splits gate from up: tpext sets this rank's
        self.across_features = across_features  # normalise the intermediate features: not shardable
        gen = torch.Generator().manual_seed(0)
        up, down = ((E, H, 2 * I), (E, I, H)) if transposed else ((E, 2 * I, H), (E, H, I))
        self.gate_up_proj = nn.Parameter(torch.randn(up, generator=gen, dtype=torch.float64) / H**0.5)
        self.down_proj = nn.Parameter(torch.randn(down, generator=gen, dtype=torch.float64) / I**0.5)
        if bias:  # GPT-OSS's: one per expert and feature, before the routing weight
            self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * I, generator=gen, dtype=torch.float64))
            self.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=gen, dtype=torch.float64))

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            up, down = self.gate_up_proj[e], self.down_proj[e]
            gate_up = x[token] @ (up if self.is_transposed else up.T)
            if hasattr(self, "gate_up_proj_bias"):
                gate_up = gate_up + self.gate_up_proj_bias[e]
            if self.is_concatenated:
                gate, up = gate_up[:, : self.intermediate_dim], gate_up[:, self.intermediate_dim :]
            else:
                gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
            h = F.silu(gate) * up
            if self.across_features:
                h = h - h.mean(-1, keepdim=True)
            y = h @ (down if self.is_transposed else down.T)
            if hasattr(self, "down_proj_bias") and not getattr(self, "bias_unweighted", False):
                y = y + self.down_proj_bias[e]
            y = y * top_k_weights[token, slot, None]
            if getattr(self, "bias_unweighted", False):  # after the routing weight: not what tpext adds
                y = y + self.down_proj_bias[e]
            out = out.index_add(0, token, y)
        return out


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, H, generator=gen, dtype=torch.float64)
    index = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOP_K, generator=gen, dtype=torch.float64)
    return x, index, weights


def _compare(dense: nn.Module, what: str, routed_only: bool = False) -> None:
    """The sharded copy of `dense` vs `dense`: output, token and routing-weight gradients, every weight's."""
    world = torch.distributed.get_world_size()
    sharded = tpext.nn.shard_experts(copy.deepcopy(dense), None)
    grads = []
    for module in (dense, sharded):
        x, index, weights = (t.requires_grad_(t.is_floating_point()) for t in _inputs())
        if routed_only:  # Llama 4's: every token to every expert, weighted first, expert by expert
            routed = x.repeat(E, 1) * weights.new_ones(E * TOKENS, 1).mul(
                torch.linspace(0.5, 1.5, E * TOKENS, dtype=x.dtype)[:, None]
            )
            out = module(routed)
        else:
            out = module(x, index, weights)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out, x.grad, None if routed_only else weights.grad))
    for name, got, want in zip(("output", "token grads", "routing weight grads"), grads[1], grads[0]):
        torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {name}: {m}")
    for e in layouts(
        sharded
    ):  # sharded weights: this rank's slice of the dense gradient; replicated: all of it
        want = e.layout.local_from_dense(dense.get_parameter(e.names[0]).grad)
        torch.testing.assert_close(e.tensor.grad, want, msg=lambda m: f"{what}: grad {e.names}: {m}")
        replicated = e.names[0] == "down_proj_bias"  # added once, after the reduction
        if world > 1:
            assert (
                e.layout.is_sharded != replicated and (e.tensor.shape != e.layout.dense_shape) != replicated
            ), what
    assert {e.names[0] for e in layouts(sharded)} == {n for n, _ in dense.named_parameters()}, what


def _matches_dense() -> None:
    world = torch.distributed.get_world_size()
    for transposed in (False, True):
        for concatenated in (False, True):
            for bias in (False, True):
                dense = Experts(transposed=transposed, concatenated=concatenated, bias=bias)
                _compare(dense, f"tp={world} transposed={transposed} concatenated={concatenated} bias={bias}")


# Hugging Face's experts modules: (config, experts class, config settings for E experts of I features)
HF_EXPERTS = {
    "gpt_oss": ("GptOssConfig", "gpt_oss.modeling_gpt_oss.GptOssExperts", {"num_local_experts": E}),
    "llama4": ("Llama4TextConfig", "llama4.modeling_llama4.Llama4TextExperts", {"num_local_experts": E}),
    "phimoe": ("PhimoeConfig", "phimoe.modeling_phimoe.PhimoeExperts", {"num_local_experts": E}),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "ernie4_5_moe.modeling_ernie4_5_moe.Ernie4_5_MoeExperts",
        {"moe_num_experts": E, "moe_intermediate_size": I},
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "hunyuan_v1_moe.modeling_hunyuan_v1_moe.HunYuanMoEV1Experts",
        {"num_experts": E, "num_local_experts": E},
    ),
}


def hf_experts(family: str) -> nn.Module:
    """A Hugging Face experts module, fp64, every weight (and bias) random, its eager forward."""
    import importlib

    import transformers

    config_name, path, settings = HF_EXPERTS[family]
    config = getattr(transformers, config_name)(hidden_size=H, intermediate_size=I, **settings)
    config._experts_implementation = "eager"
    module_path, _, cls = path.rpartition(".")
    experts = getattr(importlib.import_module(f"transformers.models.{module_path}"), cls)(config).double()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / 3)
    return experts


def _hf_matches_dense(family: str) -> None:
    dense = hf_experts(family)
    _compare(dense, f"{family} tp={torch.distributed.get_world_size()}", routed_only=family == "llama4")


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("family", sorted(HF_EXPERTS))
def test_hf_experts_match_dense(family, world):
    pytest.importorskip("transformers")
    run_ranks(_hf_matches_dense, world, family)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_experts_match_dense(world):
    run_ranks(_matches_dense, world)


def _refusals() -> list[str]:
    messages = []
    with_scale = Experts()
    with_scale.scale = nn.Parameter(torch.zeros(E, H))
    unused_bias = Experts(
        bias=True
    )  # a down bias added after the routing weight: not the weighted sum tpext adds
    unused_bias.bias_unweighted = True
    modules = [Experts(across_features=True), with_scale, nn.Linear(4, 4)]
    uneven = Experts()
    uneven.gate_up_proj = nn.Parameter(torch.zeros(E, 14, H))
    uneven.down_proj = nn.Parameter(torch.zeros(E, H, 7))
    grouped_mm = Experts().float()  # 6 fp32 features a rank: 24-byte rows
    grouped_mm.config = types.SimpleNamespace(_experts_implementation="grouped_mm")
    for module in modules + [uneven, grouped_mm, unused_bias]:
        with pytest.raises(ValueError) as err:
            tpext.nn.shard_experts(module, None)
        messages.append(str(err.value))
    return messages


def test_refusals():
    across, scale, linear, uneven, grouped_mm, unused_bias = run_ranks(_refusals, 2)[0]
    assert (
        "cannot shard Experts: its outputs on slices of every expert's intermediate features do not add up to "
        "its output (they differ); give it the style 'replicate'"
    ) in across, across
    assert "besides ['down_proj', 'gate_up_proj'] it has ['scale'], which tpext does not slice" in scale, (
        scale
    )
    assert "cannot shard Linear as experts: it needs 3-D down_proj and gate_up_proj (or up_proj)" in linear, (
        linear
    )
    assert "its experts' intermediate size 7 is not divisible by 2" in uneven, uneven
    assert (
        "with experts_implementation='grouped_mm': it needs rows of a multiple of 16 bytes, and this rank's 6 "
        "intermediate features of torch.float32 make 24"
    ) in grouped_mm, grouped_mm
    assert "do not add up to its output (they differ)" in unused_bias, unused_bias
