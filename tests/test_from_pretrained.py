"""tpext.from_pretrained: build on meta, parallelize, read only this rank's slices, vs the dense model.

Every Hugging Face family of tests/test_hf_models.py is written with ``save_pretrained`` and loaded at
tp 2 and 4, SP off and on: the logits equal those of the dense model transformers' own from_pretrained
loads from the same directory. The directories cover one file and an index with shards, tied embeddings,
renamed keys (GPT-NeoX's embed_out), per-expert weights fused into 3-D expert tensors (the MoE families),
and non-persistent buffers the model's own init computes (rotary inv_freq, Gemma's embed_scale, GPT-J's
and XGLM's sinusoidal tables).
"""

from __future__ import annotations

import json

import pytest
import torch
from dist import run_ranks

import tpext
from tpext import mappings

transformers = pytest.importorskip("transformers")
import test_hf_models as hf  # noqa: E402  (after the importorskip above)

TOL = {"rtol": 1e-5, "atol": 1e-5}
# (architecture, kv heads, attention implementation); kv 2 so that tp 4 replicates kv heads where GQA is
FAMILIES = [
    ("llama", 2, "sdpa"),
    ("mistral", 2, "sdpa"),
    ("qwen2", 2, "sdpa"),
    ("qwen3", 2, "sdpa"),
    ("gemma", 2, "sdpa"),
    ("gemma2", 2, "eager"),
    ("cohere", 2, "sdpa"),
    ("phi3", 2, "sdpa"),
    ("olmo2", 2, "sdpa"),
    ("apertus", 2, "sdpa"),
    ("phi", 2, "sdpa"),
    ("gpt_neox", 8, "sdpa"),
    ("gptj", 8, "eager"),
    ("xglm", 8, "eager"),
    ("mixtral", 2, "sdpa"),
    ("qwen2_moe", 2, "sdpa"),
    ("qwen3_moe", 2, "sdpa"),
    ("olmoe", 2, "sdpa"),
]
_SHARDED = {"llama", "qwen3_moe"}  # saved as an index + several files
_NO_SP = {"gptj"}  # GPT-J reshapes its stack's output to the full sequence: SP is refused (test_hf_models)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    for arch, kv, attn in FAMILIES:
        model = hf._model(arch, kv, attn)
        model.save_pretrained(root / arch, max_shard_size="40KB" if arch in _SHARDED else "5GB")
    return str(root)


def _load_families(root: str, families: list) -> list[str]:
    world = torch.distributed.get_world_size()
    checked = []
    for arch, _, attn in families:
        cls = getattr(transformers, hf.ARCHS[arch][1])
        dense = cls.from_pretrained(f"{root}/{arch}", attn_implementation=attn)
        config = transformers.AutoConfig.from_pretrained(f"{root}/{arch}", attn_implementation=attn)
        ids = torch.randint(
            0, hf.SMALL["vocab_size"], (2, 4 * world), generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            ref = dense(input_ids=ids).logits
        for sp in (False, True) if arch not in _NO_SP else (False,):
            auto = transformers.AutoModelForCausalLM if arch == "llama" else cls  # the Auto class too
            model = tpext.from_pretrained(auto, f"{root}/{arch}", sequence_parallel=sp, config=config)
            assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers())), arch
            if dense.config.tie_word_embeddings:
                assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, arch
            with torch.no_grad():
                logits = mappings.gather_from_tp(model(input_ids=ids).logits, hf.SMALL["vocab_size"])
            torch.testing.assert_close(
                logits, ref, **TOL, msg=lambda m, what=f"{arch} tp={world} sp={sp}": f"{what}: {m}"
            )
            checked.append(f"{arch}/sp={sp}")
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_every_family_loads_sharded(saved, world):
    checked = run_ranks(_load_families, world, saved, FAMILIES, timeout_s=600)[0]
    assert len(checked) == 2 * len(FAMILIES) - len(_NO_SP)


def _peak_load(tiny: str, big: str) -> dict:
    """Peak RSS of from_pretrained above where it started, on a model whose share + largest tensor is far
    below its dense size; a tiny load first, so the lazy imports of transformers are not counted."""
    tpext.from_pretrained(transformers.LlamaForCausalLM, tiny)
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS (VmHWM) := current RSS
    model = tpext.from_pretrained(transformers.LlamaForCausalLM, big)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    # parameters() and buffers(), not state_dict(): that hands out sharded tensors with their dense shapes
    local = [*model.parameters(), *model.buffers()]
    return {"peak": peak - before, "local": sum(t.numel() * t.element_size() for t in local)}


def test_peak_memory_is_the_share_plus_one_tensor(tmp_path):
    small = {"num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": False}
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, **small
        )
    ).save_pretrained(tmp_path / "tiny")
    dense = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, **small
        )
    )
    dense.save_pretrained(tmp_path / "big")
    sizes = [t.numel() * t.element_size() for t in dense.state_dict().values()]
    dense_bytes, largest = sum(sizes), max(sizes)
    for r in run_ranks(_peak_load, 4, str(tmp_path / "tiny"), str(tmp_path / "big"), timeout_s=300):
        assert r["local"] < dense_bytes / 3
        # 16 MiB for what the load itself allocates besides tensors (Python objects, the allocator's slack)
        assert r["peak"] <= r["local"] + largest + 16 * 2**20, (r, dense_bytes, largest)
        assert r["peak"] < dense_bytes / 2, (r, dense_bytes)


def _flavours(root: str) -> list[str]:
    """Key layouts transformers reads, dtypes, tpext's own Llama, and the errors."""
    world = torch.distributed.get_world_size()
    ids = torch.randint(0, hf.SMALL["vocab_size"], (2, 4 * world), generator=torch.Generator().manual_seed(1))
    checks = []
    # Base-model keys (no "model." prefix) into a ForCausalLM with tied embeddings, and the other way round.
    base = transformers.Qwen3Model.from_pretrained(f"{root}/qwen3_base")
    causal = tpext.from_pretrained(
        transformers.Qwen3ForCausalLM, f"{root}/qwen3_base", sequence_parallel=True
    )
    with torch.no_grad():
        ref = base(input_ids=ids).last_hidden_state @ base.embed_tokens.weight.T
        out = mappings.gather_from_tp(causal(input_ids=ids).logits, hf.SMALL["vocab_size"])
    torch.testing.assert_close(out, ref, **TOL)
    checks.append("base keys into ForCausalLM")
    dense = transformers.LlamaForCausalLM.from_pretrained(f"{root}/llama")
    with pytest.raises(
        ValueError, match=r"has tensor\(s\) the model does not: lm_head.weight .*strict=False"
    ):
        tpext.from_pretrained(transformers.LlamaModel, f"{root}/llama")
    model = tpext.from_pretrained(transformers.LlamaModel, f"{root}/llama", strict=False)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state, dense.model(input_ids=ids).last_hidden_state, **TOL
        )
    checks.append("ForCausalLM keys into the base model")
    # The recipe by hand, as the issue tried it: built on meta, parallelized, then load_checkpoint
    with torch.device("meta"):
        by_hand = transformers.LlamaForCausalLM(dense.config)
    tpext.load_checkpoint(tpext.parallelize(by_hand, sequence_parallel=True), f"{root}/llama")
    with torch.no_grad():
        torch.testing.assert_close(
            mappings.gather_from_tp(by_hand(input_ids=ids).logits, hf.SMALL["vocab_size"]),
            dense(input_ids=ids).logits,
            **TOL,
        )
    checks.append("meta + parallelize + load_checkpoint")
    # dtypes: parameters in the asked dtype, converted per slice; the rotary inv_freq stays fp32 as in transformers
    for dtype in (torch.bfloat16, torch.float16):
        model = tpext.from_pretrained(transformers.LlamaForCausalLM, f"{root}/llama", dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
        ref_model = transformers.LlamaForCausalLM.from_pretrained(f"{root}/llama", dtype=dtype)
        torch.testing.assert_close(
            model.model.rotary_emb.inv_freq, ref_model.model.rotary_emb.inv_freq, rtol=0, atol=0
        )
        local = model.model.layers[0].mlp.down_proj.weight
        start = local.shape[1] * torch.distributed.get_rank()
        assert torch.equal(
            local, ref_model.model.layers[0].mlp.down_proj.weight[:, start : start + local.shape[1]]
        )
        checks.append(f"{dtype}")
    # tpext's own Llama, from a config.json + safetensors directory
    ours = tpext.from_pretrained(tpext.models.LlamaForCausalLM, f"{root}/tpext_llama", sequence_parallel=True)
    ref_ours = tpext.models.LlamaForCausalLM(
        tpext.models.LlamaConfig.from_json(f"{root}/tpext_llama/config.json")
    )
    tpext.load_checkpoint(ref_ours, f"{root}/tpext_llama")
    with torch.no_grad():
        out = mappings.gather_from_tp(ours(ids), ours.config.vocab_size)
        torch.testing.assert_close(out, ref_ours(ids), **TOL)
    checks.append("tpext.models")
    # a missing and a misshapen tensor: named, with the file
    for broken, pattern in (
        ("missing", r"missing 1 tensor\(s\) of the model: model.layers.1.mlp.up_proj.weight"),
        (
            "shape",
            (
                r"'model.layers.0.self_attn.k_proj.weight' has shape \[24, 64\], the "
                r"model expects the dense shape \[16, 64\] \(in .*shape/model.safetensors\)"
            ),
        ),
    ):
        with pytest.raises(ValueError, match=pattern):
            tpext.from_pretrained(transformers.LlamaForCausalLM, f"{root}/{broken}")
    checks.append("errors")
    return checks


def test_checkpoint_flavours_dtypes_and_errors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf._model("qwen3", 2, "sdpa").model.save_pretrained(tmp_path / "qwen3_base")  # keys without "model."
    llama = hf._model("llama", 2, "sdpa")
    llama.save_pretrained(tmp_path / "llama")
    state = {k: v.contiguous() for k, v in llama.state_dict().items()}
    for name, change in (
        ("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
        ("shape", lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 64)})),
    ):
        llama.config.save_pretrained(tmp_path / name)
        broken = dict(state)
        change(broken)
        save_file(broken, str(tmp_path / name / "model.safetensors"))
    config = tpext.models.LlamaConfig(
        vocab_size=hf.SMALL["vocab_size"],
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    (tmp_path / "tpext_llama").mkdir()
    (tmp_path / "tpext_llama" / "config.json").write_text(json.dumps(config.to_dict()))
    tpext.save_checkpoint(tpext.models.LlamaForCausalLM(config), tmp_path / "tpext_llama")
    checks = run_ranks(_flavours, 2, str(tmp_path), timeout_s=300)[0]
    assert len(checks) == 7, checks


def test_stacked_and_concatenated_sources_read_slices(tmp_path):
    """Fused expert tensors read by slices equal the slices of stack-then-cat, as transformers fuses them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tpext.checkpoint.pretrained import Concatenated, FileTensor, Stacked

    g = torch.Generator().manual_seed(0)
    gate = [torch.randn(6, 5, generator=g) for _ in range(3)]
    up = [torch.randn(6, 5, generator=g) for _ in range(3)]
    save_file(
        {f"e.{i}.{n}": t for i, (a, b) in enumerate(zip(gate, up)) for n, t in (("gate", a), ("up", b))},
        str(tmp_path / "m.safetensors"),
    )
    file = tmp_path / "m.safetensors"
    fused = Concatenated(
        [Stacked([FileTensor(file, f"e.{i}.{n}", (6, 5)) for i in range(3)], 0) for n in ("gate", "up")], 1
    )
    dense = torch.cat([torch.stack(gate), torch.stack(up)], 1)
    assert fused.shape == tuple(dense.shape) == (3, 12, 5)
    with safe_open(str(file), framework="pt") as f:
        for index in [
            (slice(None), slice(4, 9), slice(None)),
            (slice(1, 3), slice(0, 6), slice(2, 4)),
            (slice(None), slice(6, 12), slice(None)),
        ]:
            assert torch.equal(fused.read(index, lambda _: f), dense[index]), index


class _Config(transformers.PretrainedConfig):
    model_type = "tpext_test_buffers"


class _ForgetsItsBuffer(transformers.PreTrainedModel):
    """A transformers model whose _init_weights does not write its non-persistent buffer."""

    config_class = _Config

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("table", torch.ones(3), persistent=False)
        self.post_init()

    def _init_weights(self, module):
        pass


def test_a_buffer_the_models_init_misses_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"proj.weight": torch.zeros(4, 4), "proj.bias": torch.zeros(4)}, str(tmp_path / "m.safetensors")
    )
    with torch.device("meta"):
        model = _ForgetsItsBuffer(_Config())
    with pytest.raises(
        ValueError,
        match=r"non-persistent buffer\(s\) table are in no checkpoint and "
        r"_ForgetsItsBuffer._init_weights does not initialise them",
    ):
        tpext.load_checkpoint(model, tmp_path / "m.safetensors")
