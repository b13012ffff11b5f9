"""Decoder-layer blocks that tpext cannot shard (state-space and linear-attention mixers, recurrent blocks)
are replicated whole by plan="auto" instead of refusing the model.

Checked against the dense model (fp64): logits, the labels loss and every parameter gradient, at tp 2 and 4,
with and without sequence parallelism, for Hugging Face hybrids whose replicated blocks sit before the
sequence split and after it (where they run on the full sequence): Bamba (Mamba-2 mixers of one group, which
tp cannot split, beside attention), Nemotron-H (Mamba-2, attention and MLP blocks) and RecurrentGemma
(recurrent blocks); Mamba mixers tp can split are sharded instead (tests/test_mamba.py). Also: a model with no sharded
attention under SP (no split point: it runs without SP, and says so), the one warning per parallelize
call, and the errors: a block that cannot be replicated (its layer passes sharded features between its
children), a packed MLP column layer, and under SP a block outside the decoder stack or one that returns a
weight besides its hidden states (GPT-NeoX-Japanese's attention and its dense_bias).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from checks import (
    TOKEN_IDS,
    assert_grads_match,
    assert_lm_matches,
    lm_inputs,
    lm_step,
    perturb_,
    tiny_hf_model,
)
from dist import case_result, cases_fixture, run_cases, run_ranks, sp_ids
from model_census import TINY_HF
from model_census import build as census_build

import tpext

transformers = pytest.importorskip("transformers")

f64 = torch.float64
VOCAB = TINY_HF["vocab_size"]
TOL = dict(rtol=1e-5, atol=1e-7)  # fp64 models, but Hugging Face's norms compute in fp32
CENSUS_TOL = dict(rtol=1e-4, atol=1e-5)  # the model census's (its Gemma models compute more in fp32)
_COMMON = dict(TINY_HF, num_key_value_heads=2, head_dim=8, **TOKEN_IDS)
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1)
# family: (model class, config class, config, the blocks plan="auto" replicates)
FAMILIES = {
    "bamba": (
        "BambaForCausalLM",
        "BambaConfig",
        dict(num_hidden_layers=3, attn_layer_indices=[1], **_MAMBA2),
        ["model.layers.0.mamba", "model.layers.2.mamba"],
    ),
    "nemotron_h": (
        "NemotronHForCausalLM",
        "NemotronHConfig",
        dict(
            layers_block_type=["mamba", "attention", "mamba", "mlp"],
            mamba_num_heads=8,
            mamba_head_dim=16,
            ssm_state_size=8,
            n_groups=1,
        ),
        ["model.layers.0.mixer", "model.layers.2.mixer"],
    ),
    "recurrent_gemma": (
        "RecurrentGemmaForCausalLM",
        "RecurrentGemmaConfig",
        dict(num_hidden_layers=3, block_types=["recurrent", "attention", "recurrent"], lru_width=64),
        ["model.layers.0.temporal_block", "model.layers.2.temporal_block"],
    ),
    # Mamba-2 mixers and MLPs only: no sharded attention, so no point to split the sequence at
    "bamba_no_attention": (
        "BambaForCausalLM",
        "BambaConfig",
        dict(num_hidden_layers=2, attn_layer_indices=[], **_MAMBA2),
        ["model.layers.0.mamba", "model.layers.1.mamba"],
    ),
}
CASES = [(family, sp) for family in FAMILIES for sp in (False, True)]
# Families with modules outside the decoder layers that plan="auto" replicates, as the model census builds
# them (tests/model_census.py): family: (the sequence-parallel settings it matches in, the replicated modules).
# Gemma 3's vision tower and projector run before the decoder stack (on image inputs); Gemma 4's per-layer
# embeddings read the token ids and the embeddings (under SP the model calls a norm registered after the
# layers before them: refused); Doge's decoder layers hold their own residual scales, applied to each token
# (under SP their gradients are summed over the group).
OUTSIDE = {
    "gemma3": ((False, True), ["model.vision_tower", "model.multi_modal_projector"]),
    "gemma4_text": ((False,), ["model.embed_tokens_per_layer", "model.per_layer_model_projection"]),
    "doge": ((False, True), ["model.layers.0", "model.layers.1"]),
}
OUTSIDE_CASES = [(family, sp) for family, (sps, _) in OUTSIDE.items() for sp in sps]


def _model(family: str) -> torch.nn.Module:
    """The family's tiny fp64 model, every weight moved off its init, the same on every rank."""
    if family in OUTSIDE:
        return census_build(family)
    model_cls, config_cls, settings, _ = FAMILIES[family]
    return tiny_hf_model(config_cls, model_cls, {**_COMMON, **settings})


def _compare(family: str, sp: bool) -> list[str]:
    """Logits, loss and every gradient against the dense model; returns the warnings parallelize gave."""
    world = torch.distributed.get_world_size()
    dense = _model(family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=sp)
    said = [str(w.message) for w in caught if str(w.message).startswith("tpext.parallelize:")]
    ids, labels = lm_inputs(VOCAB, 2, 4 * world)
    ref, out = lm_step(dense, input_ids=ids, labels=labels), lm_step(model, input_ids=ids, labels=labels)
    tol = CENSUS_TOL if family in OUTSIDE else TOL
    assert_lm_matches(model, dense, out, ref, f"{family} tp={world} sp={sp}", **tol)
    return said


results = cases_fixture(_compare, CASES, timeout_s=600.0)


@pytest.mark.slow
@pytest.mark.parametrize("family, sp", CASES, ids=sp_ids(CASES))
def test_replicated_blocks_match_dense(results, family, sp):
    """The model matches the dense one, and parallelize says once which blocks it replicated and what that
    costs (and, with no split point, that SP has no effect)."""
    blocks = FAMILIES[family][3]
    for said in case_result(results, (family, sp)):
        assert len(said) == 1, said
        assert "module(s) replicated, not sharded" in said[0] and "repeated on every rank" in said[0]
        assert all(f"\n  {block}: holds what tpext cannot shard" in said[0] for block in blocks), said[0]
        no_split = sp and family == "bamba_no_attention"
        assert ("sequence_parallel=True has no effect" in said[0]) == no_split, said[0]


@pytest.fixture(scope="module")
def outside_results():
    return run_cases(_compare, 2, OUTSIDE_CASES, timeout_s=600.0)


@pytest.mark.slow
@pytest.mark.parametrize("family, sp", OUTSIDE_CASES, ids=sp_ids(OUTSIDE_CASES))
def test_outside_the_layers_match_dense(outside_results, family, sp):
    """Modules outside the decoder layers' blocks (towers, projectors, per-layer embeddings, a layer's own
    scales) are replicated: logits, loss and every gradient match the dense model at tp 2, and parallelize
    names each one in its one warning."""
    for said in case_result(outside_results, (family, sp)):
        assert len(said) == 1, said
        assert "module(s) replicated, not sharded" in said[0], said[0]
        assert all(f"\n  {name}: " in said[0] for name in OUTSIDE[family][1]), said[0]


@pytest.mark.parametrize("family", list(OUTSIDE))
def test_auto_plan_replicates_outside_the_layers(family):
    """Each module is one Replicate() entry whose source says why; a tower's modules are not planned."""
    plan = tpext.auto_plan(census_build(family))
    for name in OUTSIDE[family][1]:
        assert plan[name] == tpext.parallel.Replicate(), name
        assert plan.sources[name].startswith("replicated: "), plan.sources[name]
    assert not [name for name in plan if name.startswith("model.vision_tower.")]


def _refused(family: str) -> str:
    with pytest.raises(ValueError) as err:
        tpext.parallelize(census_build(family))
    return str(err.value)


def test_parameters_of_a_model_without_a_stack_beside_its_embedding_are_refused():
    """HRM's base model holds a parameter of its own and two decoder stacks (L_module, H_module), none beside
    its word embedding: where its parameter meets the activations is the model's code, so it stays an error
    naming it."""
    said = run_ranks(_refused, 2, "hrm_text")[0]
    assert said.startswith("tpext.parallelize:"), said
    assert "could not place: model (HrmTextModel)" in said, said


def _llama_with_tower(where: str) -> torch.nn.Module:
    """Llama with a tower beside its decoder stack (model.towers), applied to the first decoder layer's
    input (before the sequence is split there under SP), to the final norm's output (after the split) or to
    the first layer's attention output (inside a layer)."""
    config = transformers.LlamaConfig(
        **{k: v for k, v in _COMMON.items() if k != "head_dim"}, num_hidden_layers=2
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.model.towers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv1d(64, 64, 1))])
    perturb_(model.to(f64))
    tower = model.model.towers[0]

    def mix(x):
        return x + tower(x.transpose(1, 2)).transpose(1, 2)

    def before(module, args, kwargs):  # before the split: parallelize's own hook comes after this one
        if args:
            return (mix(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": mix(kwargs["hidden_states"])}

    def after(module, args, output):
        return (mix(output[0]), *output[1:]) if isinstance(output, tuple) else mix(output)

    if where == "before":
        model.model.layers[0].register_forward_pre_hook(before, with_kwargs=True)
    elif where == "after":  # on the final norm's output
        model.model.norm.register_forward_hook(after)
    else:  # inside a layer, between its attention and its MLP
        model.model.layers[0].self_attn.register_forward_hook(after)
    return model


def _tower(where: str, sp: bool) -> str:
    dense = _llama_with_tower(where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tpext.parallelize(_llama_with_tower(where), sequence_parallel=sp)
    assert type(model.model.towers[0][0]) is torch.nn.Conv1d
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    try:
        out = model(input_ids=ids, labels=ids)
    except ValueError as exc:
        return str(exc)
    out.loss.backward()
    ref = dense(input_ids=ids, labels=ids)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    assert_grads_match(model, dense, where, **TOL)
    return "matches"


TOWER_CASES = [(where, sp) for where in ("before", "after", "inside") for sp in (False, True)]


@pytest.mark.parametrize("where, sp", TOWER_CASES, ids=sp_ids(TOWER_CASES))
def test_tower_outside_the_layers(where, sp):
    """A module replicated outside the decoder layers matches the dense model where it sees replicated
    activations: outside the layers without SP, and under SP before the sequence is split. Under SP after
    the split it would see this rank's shard (its gradients partial), and inside a layer it may read sharded
    features: the forward is an error naming it."""
    said = run_ranks(_tower, 2, where, sp)[0]
    if where == "inside" and not sp:
        assert said.startswith(
            "tpext.parallelize: model.towers.0 (Sequential) is replicated as a module outside the decoder "
            "layers, but it runs inside one of them (model.layers)"
        ), said
    elif where != "before" and sp:
        assert said.startswith(
            "tpext.parallelize: model.towers.0 (Sequential) is replicated outside the decoder layers and runs "
            "after the sequence is split"
        ), said
    else:
        assert said == "matches", said


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_plan_replicates_the_block_whole(family):
    """Each block is one Replicate(full_sequence=True) entry, nothing under it is planned, and its source
    names what it holds that tpext cannot shard."""
    model = _model(family)
    plan = tpext.auto_plan(model)
    blocks = [name for name, style in plan.items() if style == tpext.parallel.Replicate(full_sequence=True)]
    assert blocks == FAMILIES[family][3]
    for block in blocks:
        assert plan.sources[block].startswith("replicated: holds what tpext cannot shard: ")
        assert not [name for name in plan if name.startswith(block + ".")]
    assert f"'{blocks[0]}'" in repr(plan) and "# from replicated: holds" in repr(plan)


class _Layer(torch.nn.Module):
    """A layer with its MLP written in it (fc1 / fc2 its own children) and a mixer beside them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.mixer = torch.nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, x):
        h = self.fc1(x)
        return x + self.fc2(self.mixer(h.transpose(1, 2)).transpose(1, 2))


class _Model(torch.nn.Module):
    def __init__(self, layer=_Layer):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(32, 8)
        self.layers = torch.nn.ModuleList([layer(), layer()])
        self.lm_head = torch.nn.Linear(8, 32, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _refusals() -> list[str]:
    messages = []
    model = _Model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        tpext.parallelize(model)
    messages.append(str(err.value))
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())  # unchanged
    assert type(model.layers[0].fc1) is torch.nn.Linear
    model = _Model(torch.nn.Identity)
    model.odd = torch.nn.Conv1d(8, 8, 1)  # outside any decoder layer: not a block
    with pytest.raises(ValueError) as err:
        tpext.parallelize(model)
    messages.append(str(err.value))
    return messages


def test_blocks_that_cannot_be_replicated_are_refused():
    """A mixer beside its layer's own column / row layers may read their sharded features: refused, naming
    the layer's sharded layer; a module outside any decoder layer stays an error. The model is unchanged."""
    layer, outside = run_ranks(_refusals, 2)[0]
    assert layer.startswith("tpext.parallelize:")
    assert (
        "layers.0.mixer (Conv1d; its block layers.0.mixer cannot be replicated: layer layers.0 has its own "
        "sharded layer layers.0.fc1 (colwise)" in layer
    )
    assert "could not place: odd (Conv1d)" in outside


class _GatedMLP(torch.nn.Module):
    """fc1 packs the gate and up features (Moshi's): its output is twice fc2's input."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(16, 8)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(torch.nn.functional.silu(gate) * up)


class _GatedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _GatedMLP()

    def forward(self, x):
        return x + self.mlp(x)


def test_packed_mlp_columns_are_not_split_evenly():
    """An MLP column layer whose output is not its row layer's input packs features in a layout the names do
    not tell: not split as a plain column (which would cut the gate from its up features); its MLP block is
    replicated, naming why."""
    plan = tpext.auto_plan(_Model(_GatedLayer))
    assert plan["layers.0.mlp"] == tpext.parallel.Replicate(full_sequence=True)
    assert (
        "fc1 (Linear with 32 output features beside fc2 taking 16: a packed layout"
        in plan.sources["layers.0.mlp"]
    )
    assert not [name for name in plan if ".mlp." in name]


def _block_returning_a_weight(sp: bool) -> str:
    """GPT-NeoX-Japanese's last attention returns its dense_bias beside its output, and the layer adds it:
    replicated, it matches without SP; under SP the bias would be added to each rank's shard (a partial
    gradient), so auto_plan refuses it, naming the attention module."""
    settings = dict(
        TINY_HF, num_hidden_layers=2, intermediate_multiple_size=2, attention_dropout=0.0, **TOKEN_IDS
    )
    dense = tiny_hf_model("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tpext.parallelize(copy.deepcopy(dense), sequence_parallel=sp)
        except ValueError as exc:  # under SP: auto_plan refuses it
            return str(exc)
    ids = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    try:
        out = model(input_ids=ids, labels=ids)
    except ValueError as exc:
        return str(exc)
    ref = dense(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    return "matches"


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_block_returning_a_weight_under_sp_is_an_error(sp):
    said = run_ranks(_block_returning_a_weight, 2, sp)[0]
    if not sp:
        assert said == "matches"
    else:
        assert said.startswith(
            "tpext.parallelize: under sequence parallelism tpext cannot run gpt_neox_japanese.layers.1.attention "
            "(GPTNeoXJapaneseAttention with an output bias of its own"
        ), said


def _outside_the_stack() -> str:
    config = transformers.LlamaConfig(
        **{k: v for k, v in _COMMON.items() if k != "head_dim"}, num_hidden_layers=1
    )
    model = transformers.LlamaForCausalLM(config)
    # a list of blocks registered after the decoder stack, not in it (a second tower, say)
    model.model.towers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv1d(64, 64, 1))])
    plan = dict(tpext.auto_plan(model))
    assert plan.pop("model.towers") == tpext.parallel.Replicate()  # a module outside the layers
    plan["model.towers.0.0"] = tpext.parallel.Replicate(full_sequence=True)  # given as a block
    with pytest.raises(ValueError) as err:
        tpext.parallelize(model, plan=plan, sequence_parallel=True)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # unchanged
    return str(err.value)


def test_replicated_block_outside_the_decoder_stack_under_sp_is_an_error():
    """Under SP tpext cannot tell whether a replicated block outside the decoder stack, registered after its
    split point, sees shards: an error naming it, before anything is replaced."""
    said = run_ranks(_outside_the_stack, 2)[0]
    assert said.startswith(
        "tpext.parallelize: model.towers.0.0 (Conv1d) is replicated whole and registered after the first "
        "decoder layer model.layers.0 but outside its decoder stack"
    ), said


def test_block_holding_one_half_of_a_split_mlp_is_refused():
    """BERT's MLP is split over two children of its layer (intermediate's columns, output's rows): a block
    that holds what tpext cannot shard beside one half (an unknown module in output) is not replicated,
    since its row layer reads intermediate's sharded features; the error names the other half."""
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64
    )
    model = transformers.BertModel(config)
    model.encoder.layer[0].output.odd = torch.nn.Conv1d(4, 4, 1)
    with pytest.raises(ValueError) as err:
        tpext.auto_plan(model)
    assert (
        "its block encoder.layer.0.output cannot be replicated: encoder.layer.0.intermediate.dense has "
        "colwise layers whose other half is in the block" in str(err.value)
    ), str(err.value)
