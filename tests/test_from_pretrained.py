"""tpext.from_pretrained: build on meta, parallelize, read only this rank's slices, vs the dense model.

Every Hugging Face family of tests/test_hf_models.py is written with ``save_pretrained`` and loaded at
tp 2 and 4, SP off and on: the logits equal those of the dense model transformers' own from_pretrained
loads from the same directory. The directories cover one file and an index with shards, tied embeddings,
renamed keys (GPT-NeoX's embed_out), per-expert weights fused into 3-D expert tensors (the MoE families),
and non-persistent buffers the model's own init computes (rotary inv_freq, Gemma's embed_scale, GPT-J's
and XGLM's sinusoidal tables).
"""

from __future__ import annotations

import pytest
import torch
from dist import run_ranks

import tpext
from tpext import mappings

transformers = pytest.importorskip("transformers")
import test_hf_models as hf

TOL = dict(rtol=1e-5, atol=1e-5)
# (architecture, kv heads, attention implementation); kv 2 so that tp 4 replicates kv heads where GQA is
FAMILIES = [("llama", 2, "sdpa"), ("mistral", 2, "sdpa"), ("qwen2", 2, "sdpa"), ("qwen3", 2, "sdpa"),
            ("gemma", 2, "sdpa"), ("gemma2", 2, "eager"), ("cohere", 2, "sdpa"), ("phi3", 2, "sdpa"),
            ("olmo2", 2, "sdpa"), ("apertus", 2, "sdpa"), ("phi", 2, "sdpa"), ("gpt_neox", 8, "sdpa"),
            ("gptj", 8, "eager"), ("xglm", 8, "eager"), ("mixtral", 2, "sdpa"), ("qwen2_moe", 2, "sdpa"),
            ("qwen3_moe", 2, "sdpa"), ("olmoe", 2, "sdpa")]
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
        ids = torch.randint(0, hf.SMALL["vocab_size"], (2, 4 * world), generator=torch.Generator().manual_seed(1))
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
            torch.testing.assert_close(logits, ref, **TOL, msg=lambda m: f"{arch} tp={world} sp={sp}: {m}")
            checked.append(f"{arch}/sp={sp}")
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_every_family_loads_sharded(saved, world):
    checked = run_ranks(_load_families, world, saved, FAMILIES, timeout_s=600)[0]
    assert len(checked) == 2 * len(FAMILIES) - len(_NO_SP)
