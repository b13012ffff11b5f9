"""Styles as objects and plans as data: the user-written style of docs/parallelize.md (run from the doc itself),
auto_plan's sources (the model's own TP plan, then module names), and refusals that name the module and give
the reason for its kind."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from dist import run_ranks

import tpext
from tpext.parallel import Colwise, Replicate, Rowwise, Vocab

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "parallelize.md"


def _doc_example() -> dict:
    """The last python block of docs/parallelize.md, as a module's namespace."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    namespace: dict = {"__name__": "parallelize_doc_example"}
    exec(compile(blocks[-1], str(DOC), "exec"), namespace)
    return namespace


def _run_doc_example() -> str:
    return _doc_example()["check_user_style"]()


@pytest.mark.parametrize("world", [2, 3])
def test_user_style_from_the_docs(world):
    assert run_ranks(_run_doc_example, world) == ["ShardedScale()"] * world


def _user_style_refuses() -> str:
    ns = _doc_example()
    model = ns["MLP"](16, 24)
    with pytest.raises(ValueError) as err:
        tpext.parallelize(model, plan={"up": ns["ShardedScale"]()})
    assert type(model.up) is torch.nn.Linear  # nothing replaced
    return str(err.value)


def test_user_style_refusal_names_the_module():
    message = run_ranks(_user_style_refuses, 2)[0]
    assert message == (
        "tpext.parallelize: style 'sharded_scale' does not apply to up (Linear): it takes a "
        "FeatureScale between a colwise and a rowwise layer"
    ), message


def test_shorthands_build_the_style_objects():
    assert tpext.Style("colwise") == Colwise() and tpext.Style("rowwise") == Rowwise()
    assert tpext.Style("replicate", sum_grads=True) == Replicate(sum_grads=True)
    assert tpext.Style("vocab", gather_output=True) == Vocab(gather_output=True)
    assert repr(Colwise((tpext.Piece(4, 2),))) == "Colwise(pieces=(Piece(units=4, unit_size=2),))"
    with pytest.raises(ValueError, match="unknown style 'columnwise'"):
        tpext.Style("columnwise")
    with pytest.raises(ValueError, match="style 'rowwise' takes no gather_output"):
        tpext.Style("rowwise", gather_output=True)


transformers = pytest.importorskip("transformers")
SMALL = dict(hidden_size=64, intermediate_size=96, vocab_size=100, num_hidden_layers=1, num_attention_heads=8)


def test_auto_plan_says_where_each_entry_came_from():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2))
    plan = tpext.auto_plan(llama)
    assert plan.sources["model.layers.0.self_attn.k_proj"] == (
        "config.base_model_tp_plan ('model.layers.*.self_attn.k_proj': 'colwise')"
    )
    assert plan.sources["lm_head"] == "model._tp_plan ('lm_head': 'colwise_gather_output')"
    assert plan.sources["model.norm"] == "module names"
    assert plan["model.layers.0.self_attn.k_proj"] == Colwise(
        (tpext.Piece(2, 8),)
    )  # the heads, read by tpext
    assert plan["lm_head"] == Vocab()  # tpext's loss reads vocabulary-sharded logits
    text = str(plan)
    assert re.search(
        r"'model.layers.0.mlp.down_proj' *: Rowwise\(\),  # from config.base_model_tp_plan", text
    ), text
    assert "'model.norm'" in text and "# from module names" in text
    names_only = tpext.auto_plan(llama, use_model_plan=False)
    assert set(names_only.sources.values()) == {"module names"} and dict(names_only) == dict(plan)

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_head=8, n_layer=1, vocab_size=100)
    )
    plan = tpext.auto_plan(gpt2)
    assert set(plan.sources.values()) == {"module names"}  # GPT-2 ships no plan
    assert plan["transformer.h.0.attn.c_attn"] == Colwise((tpext.Piece(8, 8),) * 3)
    assert plan["transformer.h.0.attn.c_proj"] == Rowwise((tpext.Piece(8, 8),))
    assert plan["transformer.h.0.mlp.c_proj"] == Rowwise() and plan["transformer.wpe"] == Replicate()


def test_hf_style_names_translate():
    """A model plan's entry is honoured through tpext's styles: Qwen3's per-head q_norm keeps its summed
    gradients, a style tpext has no layer for falls back to the name, with the reason in the source."""
    qwen3 = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8)
    )
    plan = tpext.auto_plan(qwen3)
    assert plan["model.layers.0.self_attn.q_norm"] == Replicate(sum_grads=True)
    assert plan.sources["model.layers.0.self_attn.q_norm"].startswith("config.base_model_tp_plan")
    qwen3.config.base_model_tp_plan = {
        **qwen3.config.base_model_tp_plan,
        "embed_tokens": "embedding_colwise",
        "norm": "sequence_parallel",
    }
    plan = tpext.auto_plan(qwen3, sequence_parallel=True)
    assert plan["model.embed_tokens"] == Vocab()
    assert plan.sources["model.embed_tokens"] == (
        "module names (config.base_model_tp_plan's 'embedding_colwise' has no tpext equivalent)"
    )
    assert plan["model.norm"].kind == "sequence_parallel"


def _conv1d_refusals() -> list[str]:
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=64, n_head=8, n_layer=1, vocab_size=100)
    )
    messages = []
    for plan in (
        {"transformer.h.0.ln_1": "colwise"},
        {"transformer.wte": "rowwise"},
        {"transformer.h.0.mlp.act": "sequence_parallel"},
    ):
        with pytest.raises(ValueError) as err:
            tpext.parallelize(gpt2, plan=plan)
        messages.append(str(err.value))
    # A Conv1D colwise is a column layer (the dense orientation and names kept), not "a norm".
    model = tpext.parallelize(gpt2, plan={"transformer.h.0.attn.c_attn": "colwise"})
    layer = model.transformer.h[0].attn.c_attn
    messages.append(f"{type(layer).__name__} {tuple(layer.weight.shape)}")
    return messages


def test_refusals_give_the_reason_for_the_module_kind():
    norm, embedding, activation, conv1d = run_ranks(_conv1d_refusals, 2)[0]
    assert norm.startswith(
        "tpext.parallelize: style 'colwise' does not apply to transformer.h.0.ln_1 (LayerNorm): "
        "a norm is colwise only after a colwise layer whose heads it normalises"
    ), norm
    assert "transformer.wte (Embedding): an embedding's weight is [vocab, hidden]" in embedding, embedding
    assert (
        "transformer.h.0.mlp.act (NewGELUActivation): sequence_parallel takes a module with parameters"
        in activation
    ), activation
    assert conv1d == "ColumnParallelConv1D (64, 96)", conv1d  # [in, 3 * 64 / 2]


def _sizes_that_cut_a_block() -> list[str]:
    """CodeGen's 4 blocks of 2 heads, Falcon's new decoder with 2 kv groups: 4 ranks cannot take whole ones."""
    codegen = transformers.CodeGenForCausalLM(
        transformers.CodeGenConfig(
            n_embd=64, n_head=8, n_layer=1, rotary_dim=4, n_inner=96, n_positions=64, vocab_size=100
        )
    )
    falcon = transformers.FalconForCausalLM(
        transformers.FalconConfig(**SMALL, new_decoder_architecture=True, num_kv_heads=2)
    )
    messages = []
    for model in (codegen, falcon):
        with pytest.raises(ValueError) as err:
            tpext.parallelize(model)
        messages.append(str(err.value))
    assert type(codegen.transformer.h[0].attn.qkv_proj) is torch.nn.Linear  # nothing replaced
    return messages


def test_sizes_that_cut_a_block_are_refused():
    codegen, falcon = run_ranks(_sizes_that_cut_a_block, 4)[0]
    assert codegen == (
        "tpext.parallelize: transformer.h.0.attn interleaves its 8 query heads in 4 blocks of "
        "[q | v | k] (qkv_proj), and the 2 heads of a block are not divisible by the tensor-parallel "
        "size 4; each rank takes its heads of every block: pick a size that divides 2"
    ), codegen
    assert falcon.startswith(
        "tpext.parallelize: transformer.h.0.self_attention packs each of its 2 kv heads with its "
        "query heads (query_key_value)"
    ), falcon
