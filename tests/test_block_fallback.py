"""A module plan="auto" cannot shard inside a decoder layer's block (a packed qkv layout tpext does not know,
head counts that do not add up to its projections, experts with weights tpext does not slice) replicates
that block instead of refusing the model; outside a block it stays an error naming the module.

Checked against the dense model (fp64): logits, the labels loss and every parameter gradient, at tp 2 and 4,
with and without sequence parallelism, on the model census's tiny configs: MiniMax (its lightning
attention's packed qkv_proj), MiMo-V2-Flash (sliding-window layers with twice the config's kv heads, read
from the attention module itself) and Inkling (shared experts with separate gate and up weights). Also
the refusals: X-MOD's per-language adapters under SP (inside a block, but replicating it would not help).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from checks import assert_lm_matches, lm_step
from dist import case_result, cases_fixture, run_ranks, sp_ids
from model_census import build, inputs

import tpext

pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-7)  # fp64 models, but Hugging Face's norms compute in fp32
# family: (what plan="auto" replicates, {projection: its sharded pieces' total} read from the module)
FAMILIES = {
    "minimax": (["model.layers.1.self_attn"], {}),
    "mimo_v2_flash": ([], {"model.layers.1.self_attn.k_proj": 32, "model.layers.0.self_attn.k_proj": 16}),
    "inkling_text": (["model.layers.0.mlp", "model.layers.1.mlp"], {}),
}
CASES = [(family, sp) for family in FAMILIES for sp in (False, True)]


def _compare(family: str, sp: bool) -> None:
    """Logits, loss and every gradient of the parallelized model against the dense one."""
    world = torch.distributed.get_world_size()
    dense = build(family)
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tpext.parallelize(model, sequence_parallel=sp)
    ids, labels = inputs()
    ref, out = lm_step(dense, input_ids=ids, labels=labels), lm_step(model, input_ids=ids, labels=labels)
    assert_lm_matches(model, dense, out, ref, f"{family} tp={world} sp={sp}", **TOL)


results = cases_fixture(_compare, CASES, timeout_s=600.0)


@pytest.mark.slow
@pytest.mark.parametrize("family, sp", CASES, ids=sp_ids(CASES))
def test_blocks_that_cannot_be_sharded_match_dense(results, family, sp):
    case_result(results, (family, sp))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_plan_replicates_the_block_or_reads_the_heads(family):
    """The block holding what tpext cannot shard is replicated, its reason in the plan's source; heads are
    read from the attention module where it holds its own (MiMo-V2-Flash's sliding-window layers)."""
    blocks, features = FAMILIES[family]
    plan = tpext.auto_plan(build(family))
    for block in blocks:
        assert plan[block] == tpext.parallel.Replicate(full_sequence=True), plan
        assert plan.sources[block].startswith("replicated: holds what tpext cannot shard"), plan.sources[
            block
        ]
        assert not any(name.startswith(block + ".") for name in plan), plan
    for name, total in features.items():
        assert sum(p.size for p in plan[name].pieces) == total, plan[name]


def test_minimax_names_the_packed_qkv_proj():
    plan = tpext.auto_plan(build("minimax"))
    assert (
        "qkv_proj (Linear: MiniMaxLightningAttention.qkv_proj: tpext knows a packed qkv_proj's layout"
        in (plan.sources["model.layers.1.self_attn"])
    )


class _Attention(torch.nn.Module):
    """A packed qkv_proj beside an out_proj: a layout tpext does not know."""

    num_heads, head_dim = 2, 4

    def __init__(self):
        super().__init__()
        self.qkv_proj, self.out_proj = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.out_proj(self.qkv_proj(x)[..., :8])


def test_cannot_shard_outside_a_block_is_an_error():
    """Outside any decoder layer's block the same reason is an error naming the module and its class."""
    model = torch.nn.Module()
    model.attn = _Attention()
    with pytest.raises(
        ValueError, match=r"^tpext\.parallelize: attn\.qkv_proj \(Linear\): _Attention\.qkv_proj"
    ):
        tpext.auto_plan(model)


def _xmod_under_sp() -> str:
    model = build("xmod")
    with pytest.raises(ValueError) as err:
        tpext.parallelize(model, sequence_parallel=True)
    return str(err.value)


def test_xmod_adapters_are_refused_under_sp():
    """X-MOD's adapters pick tokens by the full sequence's language ids: under SP a refusal naming them, not
    their block replicated (whose layer shards the MLP that feeds it)."""
    message = run_ranks(_xmod_under_sp, 2)[0]
    assert message.startswith(
        "tpext.parallelize: under sequence parallelism tpext cannot run "
        "roberta.encoder.layer.0.output.adapter_modules.en_XX.dense1 (Linear in a per-language adapter"
    ), message


def _hy_v4_under_sp() -> str:
    model = build("hy_v4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tpext.parallelize(model, sequence_parallel=True)
    ids, labels = inputs()
    with pytest.raises(ValueError) as err:
        model(input_ids=ids, labels=labels)
    return str(err.value)


def test_hy_v4_hyper_connections_are_refused_under_sp():
    """HY-V4's hyper-connection blocks (replicated) return (mixing weights, hidden states): under SP only the
    first is split back to a shard, so the model is refused in forward, naming the block."""
    message = run_ranks(_hy_v4_under_sp, 2)[0]
    assert message.startswith(
        "tpext.parallelize: model.layers.0.attn_hc (HYV4HyperConnection) is replicated whole"
    ), message
    assert "it returns a tensor over the full sequence (output 1" in message, message
