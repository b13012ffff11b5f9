"""tpext.parallelize on the Llama-style reference model vs the dense model.

Logits and every parameter gradient, fp64 (tight) and fp32 (<= 1e-5 relative), for tp in {1, 2, 4},
SP on and off, grouped-query attention with tp < kv heads, tp = kv heads and tp > kv heads, packed
QKV / gate_up weights, tied embeddings. Plus the collective counts of a step and the error messages.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from checks import assert_grads_match
from dist import run_ranks

import tpext
from tpext import mappings
from tpext.models import LlamaConfig, LlamaForCausalLM
from tpext.models.llama import LlamaRMSNorm
from tpext.sharding import layouts

f64 = torch.float64
SMALL = dict(hidden_size=64, intermediate_size=96, vocab_size=100, num_hidden_layers=2, num_attention_heads=8)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}

# (kv heads, sequence_parallel, packed, tied): per tp size, kv heads above, equal to and below tp.
CASES = {
    1: [(4, False, False, False), (2, True, True, True)],
    2: [
        (4, False, False, False),
        (4, True, True, False),
        (2, True, False, True),
        (2, False, True, False),
        (1, True, False, False),
        (1, False, True, True),
    ],
    4: [
        (8, True, False, False),
        (8, False, True, True),
        (4, False, False, True),
        (4, True, True, False),
        (2, True, False, False),
        (2, False, True, True),
        (1, True, True, False),
        (1, False, False, True),
    ],
}


def _compare(
    kv: int, sp: bool, packed: bool, tied: bool, dtype: torch.dtype, share_inputs: bool = True, **extra
) -> None:
    world = dist.get_world_size()
    cfg = LlamaConfig(**{**SMALL, **extra}, num_key_value_heads=kv, packed=packed, tie_word_embeddings=tied)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg, dtype=dtype)
    model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=sp, share_inputs=share_inputs)
    ids = torch.randint(0, cfg.vocab_size, (2, 4 * world), generator=torch.Generator().manual_seed(1))
    logits_ref = dense(ids)
    dense.loss(logits_ref, ids).backward()
    logits = model(ids)
    model.loss(logits, ids).backward()

    what = (
        f"tp={world} kv={kv} sp={sp} packed={packed} tied={tied} share_inputs={share_inputs} {extra} {dtype}"
    )
    torch.testing.assert_close(
        mappings.gather_from_tp(logits, cfg.vocab_size),
        logits_ref,
        **TOL[dtype],
        msg=lambda m: f"{what}: logits: {m}",
    )
    entries = layouts(model)
    assert len(entries) == len(layouts(dense)), what
    assert assert_grads_match(model, dense, what, **TOL[dtype]) == len(entries), what


def _check_cases(dtype: torch.dtype) -> None:
    cases = CASES[dist.get_world_size()]
    for case in cases:
        _compare(*case, dtype)
    for case in cases[:3]:  # one projection, one collective: the unshared path
        _compare(*case, dtype, share_inputs=False)
    # Qwen2 q/k/v biases, Qwen3 per-head q/k norms, an intermediate size that does not divide.
    _compare(1, True, False, False, dtype, attention_bias=True, qk_norm=True, intermediate_size=90)
    _compare(2, False, True, True, dtype, attention_bias=True, qk_norm=True, intermediate_size=90)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_model_matches_dense_fp64(world):
    run_ranks(_check_cases, world, f64)


@pytest.mark.parametrize("world", [2, 4])
def test_model_matches_dense_fp32(world):
    run_ranks(_check_cases, world, torch.float32)


def _comm_counts(sp: bool, share_inputs: bool) -> dict:
    cfg = LlamaConfig(**SMALL, num_key_value_heads=2)
    model = tpext.parallelize(
        LlamaForCausalLM(cfg, dtype=f64), sequence_parallel=sp, share_inputs=share_inputs
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    with tpext.comm_stats() as stats:
        model.loss(model(ids), ids).backward()
    return {phase: stats.by_kind(phase) for phase in ("forward", "backward")}


def test_collectives_per_step():
    n = SMALL["num_hidden_layers"]
    # Without SP: o_proj and down_proj all-reduce forward; embedding 1; the vocab-parallel loss 2 small
    # ones (max, sums; V comes from the lm_head). Backward: grad_x of the q/k/v and of the gate/up inputs, once each
    # with shared inputs (once per projection without), and of lm_head.
    counts = run_ranks(_comm_counts, 2, False, True)[0]
    assert counts == {"forward": {"all_reduce": 2 * n + 1 + 2}, "backward": {"all_reduce": 2 * n + 1}}
    counts = run_ranks(_comm_counts, 2, False, False)[0]
    assert counts == {"forward": {"all_reduce": 2 * n + 1 + 2}, "backward": {"all_reduce": 5 * n + 1}}
    # With SP each all-reduce of activations in the layers becomes reduce-scatter + all-gather; the
    # embedding still all-reduces (the sequence is split at the first layer's input, whose backward
    # all-gathers), the column layers gather their input again for the weight gradient (2 per layer +
    # lm_head), and the norms' weight gradients (2 per layer + the final norm) are all-reduced.
    counts = run_ranks(_comm_counts, 2, True, True)[0]
    assert counts == {
        "forward": {"all_gather": 2 * n + 1, "reduce_scatter": 2 * n, "all_reduce": 1 + 2},
        "backward": {"reduce_scatter": 2 * n + 1, "all_gather": 2 * (2 * n + 1), "all_reduce": 2 * n + 1},
    }
    # Unshared, gate and up gather on their own; q/k/v still share the gather at the attention input.
    counts = run_ranks(_comm_counts, 2, True, False)[0]
    assert counts["forward"]["all_gather"] == 3 * n + 1 and counts["backward"]["reduce_scatter"] == 3 * n + 1


def _errors() -> list[str]:
    messages = []
    for bad in (
        dict(num_key_value_heads=2, num_attention_heads=6, head_dim=8),  # 6 heads over 4
        dict(num_key_value_heads=3, num_attention_heads=12, head_dim=8),
    ):  # 3 kv heads over 4
        cfg = LlamaConfig(**{**SMALL, **bad})
        with pytest.raises(ValueError) as err:
            tpext.parallelize(LlamaForCausalLM(cfg))
        messages.append(str(err.value))
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    model.model.layers[0].extra = torch.nn.Parameter(torch.ones(4, 4))  # a layer's own weight: not a scale
    with pytest.raises(ValueError, match=r"could not place: model\.layers\.0 \(LlamaDecoderLayer"):
        tpext.parallelize(model)
    with pytest.raises(ValueError, match="unknown style 'columnwise'"):
        tpext.parallelize(LlamaForCausalLM(LlamaConfig(**SMALL)), plan={"*q_proj": "columnwise"})
    with pytest.raises(ValueError, match="style 'rowwise' does not apply to model.embed_tokens"):
        tpext.parallelize(LlamaForCausalLM(LlamaConfig(**SMALL)), plan={"model.embed_tokens": "rowwise"})
    sp_model = tpext.parallelize(LlamaForCausalLM(LlamaConfig(**SMALL)), sequence_parallel=True)
    with pytest.raises(
        ValueError, match=r"sequence length \(dim 1\) divisible by the tensor-parallel size 4"
    ):
        sp_model(torch.zeros(2, 6, dtype=torch.long))

    # Subclasses whose forward does more than the plain layer's are not sharded as if they were plain.
    class ScaledLinear(torch.nn.Linear):  # an adapter or quantized layer, say
        def forward(self, x):
            return super().forward(x) * 2

    class DirectEmbedding(
        torch.nn.Embedding
    ):  # indexes its weight itself: no place for a vocab-parallel lookup
        def forward(self, ids):
            return self.weight[ids] * 2

    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    model.model.layers[1].mlp.up_proj.__class__ = ScaledLinear
    # plan="auto" replicates the MLP around it whole (a block of its decoder layer), naming why
    plan = tpext.auto_plan(model)
    assert plan["model.layers.1.mlp"] == tpext.parallel.Replicate(full_sequence=True)
    assert (
        "up_proj (ScaledLinear: an nn.Linear with a forward of its own)" in plan.sources["model.layers.1.mlp"]
    )
    plan = {"*.up_proj": "colwise", "*norm": "sequence_parallel"}
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.mlp\.up_proj is a ScaledLinear, an nn\.Linear subclass "
        r"with a forward of its own",
    ):
        tpext.parallelize(model, plan=plan, sequence_parallel=True)
    # The layer-0 norms, converted before the error, were copies: the model is as it was.
    assert type(model.model.layers[0].post_attention_layernorm) is type(model.model.norm) is LlamaRMSNorm
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    model.model.embed_tokens.__class__ = DirectEmbedding
    with pytest.raises(
        ValueError,
        match=r"model\.embed_tokens: tpext: cannot shard the vocabulary of a "
        r"DirectEmbedding: DirectEmbedding\.forward does not look up through "
        r"nn\.Embedding\.forward",
    ):
        tpext.parallelize(model)
    return messages


def test_errors():
    messages = run_ranks(_errors, 4)[0]
    assert "has 6 query heads, not divisible by the tensor-parallel size 4" in messages[0]
    assert "3 heads of 8" in messages[1] and "4 neither divides 3" in messages[1]


def _custom_plan(kv: int) -> list:
    """A plan with wildcards and plain strings: the same numbers as the dense model; the attention
    projections are still split in whole heads (replicated kv heads when tp > kv)."""
    cfg = LlamaConfig(**SMALL, num_key_value_heads=kv)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg, dtype=f64)
    plan = {
        "*.q_proj": "colwise",
        "*.k_proj": "colwise",
        "*.v_proj": "colwise",
        "*.o_proj": "rowwise",
        "*.mlp.gate_proj": "colwise",
        "*.mlp.up_proj": "colwise",
        "*.down_proj": "rowwise",
        "model.embed_tokens": "vocab",
        "lm_head": "vocab",
    }
    model = tpext.parallelize(copy.deepcopy(dense), plan=plan)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    loss, loss_ref = model.loss(model(ids), ids), dense.loss(dense(ids), ids)
    return [
        float(loss - loss_ref),
        model.model.layers[0].self_attn.num_heads,
        model.model.layers[0].self_attn.num_key_value_heads,
    ]


@pytest.mark.parametrize("world,kv", [(2, 4), (4, 2)])
def test_custom_plan(world, kv):
    for diff, local_heads, local_kv in run_ranks(_custom_plan, world, kv):
        assert abs(diff) < 1e-12 and (local_heads, local_kv) == (8 // world, max(kv // world, 1))


def test_auto_plan_is_data():
    model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, packed=True))
    plan = tpext.auto_plan(model)
    assert plan["model.layers.0.self_attn.qkv_proj"] == tpext.Style(
        "colwise", (tpext.Piece(8, 8), tpext.Piece(2, 8), tpext.Piece(2, 8))
    )
    assert plan["model.layers.1.mlp.gate_up_proj"] == tpext.Style(
        "colwise", (tpext.Piece(96), tpext.Piece(96))
    )
    assert plan["model.layers.1.self_attn.o_proj"].kind == "rowwise"
    assert plan["model.embed_tokens"].kind == plan["lm_head"].kind == "vocab"
    assert plan["model.norm"].kind == "replicate"
    assert tpext.auto_plan(model, sequence_parallel=True)["model.norm"].kind == "sequence_parallel"


def _edge_cases() -> dict:
    world = dist.get_world_size()
    out = {}
    # Uneven shards (vocab 101 over 2) must not leave the ranks in different RNG states.
    torch.manual_seed(0)
    tpext.parallelize(LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": 101})))
    draws = [None] * world
    dist.all_gather_object(draws, torch.rand(4).tolist())
    out["rng_equal"] = all(d == draws[0] for d in draws)

    # A tie made by assignment, without config.tie_word_embeddings, stays a tie, with exact gradients.
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SMALL), dtype=f64)
    dense.lm_head.weight = dense.model.embed_tokens.weight
    model = tpext.parallelize(copy.deepcopy(dense))
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(3))
    dense.loss(dense(ids), ids).backward()
    model.loss(model(ids), ids).backward()
    emb = model.model.embed_tokens
    out["tied"] = model.lm_head.weight is emb.weight
    out["tied_grad_err"] = float(
        (emb.weight.grad - dense.model.embed_tokens.weight.grad[emb.vocab_start : emb.vocab_end]).abs().max()
    )

    # More ranks than query heads: a clear error, and the model is left as it was.
    small = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_attention_heads": 2, "num_key_value_heads": 1}))
    with pytest.raises(ValueError, match="has 2 query heads, not divisible by the tensor-parallel size 4"):
        tpext.parallelize(small)
    out["untouched"] = type(small.model.layers[0].self_attn.q_proj) is torch.nn.Linear

    with pytest.raises(ValueError, match="already parallelized"):
        tpext.parallelize(model)

    # nn.RMSNorm with its default eps=None under SP; full logits when asked for.
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SMALL), dtype=f64)
    for layer in dense.model.layers:
        layer.input_layernorm = torch.nn.RMSNorm(SMALL["hidden_size"], dtype=f64)
    plan = tpext.auto_plan(dense, sequence_parallel=True, vocab_parallel_logits=False)
    model = tpext.parallelize(copy.deepcopy(dense), plan=plan, sequence_parallel=True)
    logits, ref = model(ids), dense(ids)
    out["full_logits_err"] = float((logits - ref).abs().max()) if logits.shape == ref.shape else float("inf")

    # Shared inputs: an input changed in place, or a call under no_grad, is computed afresh.
    x = torch.randn(2, 8, SMALL["hidden_size"], dtype=f64)
    attn = tpext.parallelize(copy.deepcopy(dense), plan=tpext.auto_plan(dense)).model.layers[0].self_attn
    attn.q_proj(x)
    x.add_(1.0)
    k_fresh = torch.nn.functional.linear(x, attn.k_proj.weight)
    out["stale_err"] = float((attn.k_proj(x) - k_fresh).abs().max())
    attn.q_proj(x)
    with torch.no_grad():
        out["no_grad_output_requires_grad"] = attn.k_proj(x).requires_grad
    return out


def test_edge_cases():
    for rank, out in enumerate(run_ranks(_edge_cases, 4)):
        assert out["rng_equal"], f"rank {rank}: RNG states differ after parallelize"
        assert out["tied"] and out["tied_grad_err"] < 1e-12, (rank, out)
        assert out["untouched"], rank
        assert out["full_logits_err"] < 1e-12, (rank, out)
        assert out["stale_err"] < 1e-12 and not out["no_grad_output_requires_grad"], (rank, out)


def _deepcopy() -> None:
    """copy.deepcopy of a parallelized model (an EMA or reference copy): the copy shares the process group,
    owns its parameters, and its hooks and shared-input groups use its own layers."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=4), dtype=f64)
    model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=True)
    ids = torch.randint(0, 100, (2, 4 * world), generator=torch.Generator().manual_seed(1))
    model.model.layers[0].self_attn.q_proj(torch.zeros(2, 4 * world, SMALL["hidden_size"], dtype=f64))
    twin = copy.deepcopy(model)  # with k/v outputs still kept for their calls: the copy starts afresh
    q, q_orig = twin.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    assert q._siblings._outputs == {} and q_orig._siblings._outputs
    assert q.group is q_orig.group and q.weight is not q_orig.weight
    assert q._siblings.layers[0] is q and q_orig._siblings.layers[0] is q_orig
    with torch.no_grad():  # the twin drifts away; the original and its dense model must not
        for p in twin.parameters():
            p.mul_(0.5)
        for p in dense.parameters():
            p.mul_(0.5)
    logits = twin(ids)
    twin.loss(logits, ids).backward()
    ref = dense(ids)
    dense.loss(ref, ids).backward()
    torch.testing.assert_close(mappings.gather_from_tp(logits, SMALL["vocab_size"]), ref, **TOL[f64])
    assert_grads_match(twin, dense, "twin", **TOL[f64])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(
        TypeError,
        match=r"tpext: a \w+ holds a process group and cannot be pickled \(torch.save of "
        r"a tensor-parallel model\); save its weights with tpext.save_checkpoint",
    ):
        torch.save(model, io.BytesIO())
    shallow = copy.copy(model.model.layers[0].self_attn.q_proj)
    assert shallow.weight is q_orig.weight and shallow.group is q_orig.group


def test_deepcopy():
    run_ranks(_deepcopy, 2)
