"""Mamba-2 mixers (Mamba2's and the hybrids') sharded by heads, Mamba-1 mixers by channels, under plan="auto",
with and without sequence parallelism: logits, loss and every parameter gradient against the dense model (fp64, tp 2 and 4); a mixer
whose groups do not split falls back to replication; greedy generation as the dense model's."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.distributed as tdist
from checks import assert_grads_match, collectives_under
from dist import case_result, run_cases, run_ranks
from model_census import OVERRIDES, build

import tpext
from tpext import mappings
from tpext.parallel import Colwise, Replicate, Rowwise
from tpext.parallel.mamba import GroupedNorm, MambaConv, MambaMixer
from tpext.sharding import Piece, layouts

transformers = pytest.importorskip("transformers")

TOL = dict(rtol=1e-5, atol=1e-6)  # fp64 models; Hugging Face's loss and norms compute in fp32
VOCAB, BATCH, SEQ = 128, 2, 8  # the census's tiny models (tests/model_census.py): SEQ divisible by 2 and 4
# Families with a Mamba-2 mixer, from the census's tiny config: 8 heads of 16 in 4 groups, state 8; and with a
# Mamba-1 mixer: 128 channels, state 8 (Jamba's beside mixture-of-experts blocks).
FAMILIES = ["bamba", "falcon_h1", "granitemoehybrid", "mamba2", "nemotron_h", "zamba2"]
FAMILIES += ["falcon_mamba", "jamba", "mamba"]
# (family, sequence_parallel, padded): padded, the first sequence's last two tokens are padding (an
# attention mask the mixers apply to their input and their convolution's output)
CASES = [(f, sp, False) for f, sp in itertools.product(FAMILIES, (False, True))]
CASES += [("mamba2", True, True), ("bamba", True, True), ("falcon_h1", False, True)]
WORLD_SIZES = [2, 4]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=gen)
    return ids, ids.masked_fill(torch.rand(ids.shape, generator=gen) < 0.2, -100)


def _sharded_mixers(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__.endswith(("Mixer", "MambaLayer"))]


def _compare(family: str, sp: bool, padded: bool) -> int:
    """Asserts logits, loss and every parameter gradient of the tensor-parallel model equal the dense one's
    (this rank's slice, by its layout), and that every mixer's in_proj is sharded. Returns how many
    gradients were compared."""
    dense = build(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the blocks the census models replicate besides their mixers
        model = tpext.parallelize(copy.deepcopy(dense), plan="auto", sequence_parallel=sp)
    what = f"{family} tp={tdist.get_world_size()} sp={sp} padded={padded}"
    mixers = [n for n in _sharded_mixers(dense) if hasattr(dense.get_submodule(n), "A_log")]
    assert mixers, what
    for name in mixers:
        layout = tpext.sharding.get_layout(
            model.get_submodule(f"{name}.in_proj"), "weight", model.get_submodule(f"{name}.in_proj").weight
        )
        assert layout.is_sharded, f"{what}: {name}.in_proj is not sharded"
    ids, labels = _inputs()
    kwargs = dict(input_ids=ids, labels=labels)
    if padded:
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        kwargs.update(attention_mask=mask, labels=labels.masked_fill(mask == 0, -100))
    ref = dense(**kwargs)
    ref.loss.backward()
    out = model(**kwargs)
    out.loss.backward()
    logits = mappings.gather_from_tp(out.logits, VOCAB) if out.logits.shape[-1] != VOCAB else out.logits
    torch.testing.assert_close(logits, ref.logits, **TOL, msg=lambda m: f"{what}: logits: {m}")
    torch.testing.assert_close(out.loss, ref.loss, **TOL, msg=lambda m: f"{what}: loss: {m}")
    assert len(layouts(model)) == len(layouts(dense)), what
    return assert_grads_match(model, dense, what, **TOL)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"tp{w}")
def mamba_results(request):
    return run_cases(_compare, request.param, CASES, timeout_s=600.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, sp, padded",
    CASES,
    ids=[f"{f}-{'sp' if sp else 'nosp'}{'-padded' if padded else ''}" for f, sp, padded in CASES],
)
def test_mamba_matches_dense(mamba_results, family, sp, padded):
    """Logits, loss and every parameter gradient (Mamba-2: in_proj's five pieces, conv1d's channels, dt_bias,
    A_log, D and the gated norm by heads and groups; Mamba-1: in_proj, conv1d, dt_proj, A_log and D by
    channels, x_proj row-parallel with its output whole; out_proj row-parallel) against the dense model."""
    compared = case_result(mamba_results, (family, sp, padded))
    assert compared[0] > 10 and len(set(compared)) == 1, compared


def test_auto_plan_reads_mamba_heads():
    """in_proj packs z, x (8 heads of 16), B, C (4 groups of 8) and dt (8 heads); conv1d the x, B and C
    channels; the norm 4 groups of 32; out_proj the heads' features."""
    plan = tpext.auto_plan(build("mamba2"), tp_size=2)
    mixer = "backbone.layers.0.mixer"
    heads, groups = Piece(8, 16), Piece(4, 8)
    assert plan[mixer] == MambaMixer(8, 16, 4, 8)
    assert plan[mixer + ".in_proj"] == Colwise((heads, heads, groups, groups, Piece(8)))
    assert plan[mixer + ".conv1d"] == MambaConv((heads, groups, groups))
    assert plan[mixer + ".norm"] == GroupedNorm((Piece(4, 32),))
    assert plan[mixer + ".out_proj"] == Rowwise((heads,))
    assert not any(s.startswith("replicated") for s in plan.sources.values()), plan.sources


def _replicated_fallback() -> tuple[str, list[str]]:
    """The plan source of a mixer whose 4 groups do not split over 8 ranks (a plan only), and the warnings
    of parallelize over this group of a Mamba2 model with one group, whose logits are checked."""
    source = tpext.auto_plan(build("mamba2"), tp_size=8).sources["backbone.layers.0.mixer"]
    config = transformers.Mamba2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_heads=8,
        head_dim=16,
        state_size=8,
        n_groups=1,
        expand=2,
        vocab_size=VOCAB,
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dense = transformers.Mamba2ForCausalLM(config).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = tpext.parallelize(copy.deepcopy(dense), plan="auto")
    ids, _ = _inputs()
    logits = mappings.gather_from_tp(model(input_ids=ids).logits, VOCAB)
    torch.testing.assert_close(logits, dense(input_ids=ids).logits, **TOL)
    return source, [str(w.message) for w in caught]


def test_unsplittable_mixer_is_replicated():
    """A mixer whose heads and groups the tensor-parallel size does not divide keeps today's replication,
    the reason in its plan source and in parallelize's warning."""
    source, messages = run_ranks(_replicated_fallback, 2)[0]
    assert source.startswith("replicated: "), source
    assert "4 groups, not both divisible by the tensor-parallel size 8" in source, source
    warning = next(m for m in messages if "replicated, not sharded" in m)
    assert "backbone.layers.0.mixer" in warning and "1 groups" in warning, warning


def _generate(family: str) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy generation of 4 tokens, with the model's cache, by the dense and the parallelized model."""
    dense = build(family)
    dense.config.use_cache = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpext.auto_plan(dense, vocab_parallel_logits=False, tp_size=tdist.get_world_size())
        model = tpext.parallelize(copy.deepcopy(dense), plan=plan)
    ids, _ = _inputs()
    kwargs = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        want, got = dense.generate(ids, **kwargs), model.generate(ids, **kwargs)
    return want.tolist(), got.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mamba2", "bamba", "falcon_h1", "mamba"])
def test_generate_matches_dense(family):
    """The mixers' caches hold this rank's heads (Hugging Face's cache takes its shapes from the states it
    is given): greedy generation gives the dense model's tokens."""
    for want, got in run_ranks(_generate, 2, family, timeout_s=300.0):
        assert got == want


def test_overrides_build_sharded_mixers():
    """The census's tiny configs give the Mamba-2 families 4 groups, so tp 2 and 4 shard them."""
    for family in ("bamba", "granitemoehybrid", "mamba2", "falcon_h1", "zamba2", "nemotron_h"):
        assert any("groups" in k for k in OVERRIDES[family]), family


def _mixer_collectives(sp: bool) -> list[tuple[str, str, str, int]]:
    """(phase, collective, module, bytes) of the second layer's mixer, one forward and backward."""
    model = tpext.parallelize(build("mamba2", torch.float64), sequence_parallel=sp)
    ids, labels = _inputs()
    return collectives_under(model, "backbone.layers.1.mixer", input_ids=ids, labels=labels)


@pytest.mark.parametrize("sp", [False, True], ids=["nosp", "sp"])
def test_mixer_collectives(sp):
    """One forward and backward of a sharded mixer at tp 2: out_proj's all-reduce and in_proj's input gradient
    all-reduce ([2, 8, 64] fp64: 8192 bytes each); under SP the gather of the sequence and out_proj's
    reduce-scatter, their duals in backward, and in_proj's input gathered again for its weight gradient
    (tpext keeps only the shard). Nothing else: conv1d, the scan and the norm stay local."""
    hidden = BATCH * SEQ * 64 * 8
    if sp:
        want = [
            ("backward", "all_gather", "in_proj", hidden),  # its input again, for the weight gradient
            ("backward", "all_gather", "out_proj", hidden),
            ("backward", "reduce_scatter", "in_proj", hidden),
            ("forward", "all_gather", "in_proj", hidden),
            ("forward", "reduce_scatter", "out_proj", hidden),
        ]
    else:
        want = [("backward", "all_reduce", "in_proj", hidden), ("forward", "all_reduce", "out_proj", hidden)]
    got = run_ranks(_mixer_collectives, 2, sp)
    assert got[0] == sorted(want) and got[1] == got[0], got


# (family, module, its style in an otherwise automatic plan, what the error says): plans tpext refuses.
_WRONG_PLANS = {
    "in_proj-plain-colwise": ("mamba2", "backbone.layers.0.mixer.in_proj", "colwise", "plan_entries does"),
    "norm-not-summed": ("jamba", "model.layers.1.mamba.dt_layernorm", "replicate", "plan_entries does"),
    "mixer-replicated": ("mamba2", "backbone.layers.0.mixer", "replicate", "the mixer itself is not planned"),
}


def _wrong_plan(family: str, name: str, style: str) -> str:
    plan = tpext.auto_plan(build(family), tp_size=2)
    plan[name] = style
    with pytest.raises(ValueError, match="tpext.parallelize") as err:
        tpext.parallelize(build(family), plan=plan)
    return str(err.value)


@pytest.mark.parametrize("case", list(_WRONG_PLANS))
def test_mixer_planned_otherwise_is_refused(case):
    """A mixer's layer planned otherwise than sharding the mixer needs (in_proj without its five pieces, a
    Mamba-1 norm whose gradient would stay partial) or sharded beside an unsharded mixer: an error naming the
    module, before anything is converted, not a wrong output."""
    family, name, style, says = _WRONG_PLANS[case]
    messages = run_ranks(_wrong_plan, 2, family, name, style)
    assert all(says in m and name.rpartition(".")[0] in m for m in messages), messages


def test_auto_plan_reads_mamba1_channels():
    """A Mamba-1 mixer by its 128 channels: in_proj packs x and z, x_proj row-parallel with its output
    gradient summed, dt_proj's rows sliced; Jamba's norms of dt, B and C replicated with summed gradients."""
    from tpext.parallel.mamba import Mamba1Mixer, MambaXProj, SlicedRows

    plan = tpext.auto_plan(build("jamba"), tp_size=2)
    mixer = "model.layers.1.mamba"
    channels = Piece(128)
    assert plan[mixer] == Mamba1Mixer(128, 8)
    assert plan[mixer + ".in_proj"] == Colwise((channels, channels))
    assert plan[mixer + ".conv1d"] == MambaConv((channels,))
    assert plan[mixer + ".x_proj"] == MambaXProj(128)
    assert plan[mixer + ".dt_proj"] == SlicedRows((channels,))
    assert plan[mixer + ".out_proj"] == Rowwise((channels,))
    assert plan[mixer + ".dt_layernorm"] == Replicate(sum_grads=True)


def _from_checkpoint(family: str, path: str) -> None:
    """A meta-device model, parallelized, filled from the dense checkpoint: the dense logits (its deep copy's
    too), and the dense state dict gathered back."""
    dense = build(family)
    with torch.device("meta"):
        meta = type(dense)(dense.config).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tpext.parallelize(meta, plan="auto")
    tpext.load_checkpoint(model, path)
    ids, _ = _inputs()
    logits = mappings.gather_from_tp(model(input_ids=ids).logits, VOCAB)
    torch.testing.assert_close(logits, dense(input_ids=ids).logits, **TOL)
    twin = copy.deepcopy(model)  # shares the group, copies the sliced mixers
    torch.testing.assert_close(mappings.gather_from_tp(twin(input_ids=ids).logits, VOCAB), logits)
    gathered = tpext.gather_state_dict(model)
    state = dense.state_dict()
    assert gathered.keys() == state.keys()
    assert all(torch.equal(gathered[k], v) for k, v in state.items())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mamba2", "bamba", "jamba"])
def test_meta_model_loads_dense_checkpoint(family, tmp_path):
    """Every sharded mixer parameter (in_proj's pieces, conv1d, dt_bias / A_log / D, the norm, x_proj,
    dt_proj) is read from its slices of the dense checkpoint and gathered back whole."""
    path = tmp_path / "ckpt"
    build(family).save_pretrained(path)
    run_ranks(_from_checkpoint, 2, family, str(path), timeout_s=300.0)
