"""Dense safetensors checkpoints and tensor-parallel models: shard on read, gather, reshard across tp sizes.

dense -> load at tp=2 -> save (sharded files + index) -> load at tp=4 -> gather == original, bit for bit;
each rank reads only its slices; missing / misshapen / unexpected tensors are errors naming the key.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from dist import SMALL_LLAMA, run_ranks
from safetensors.torch import save_file

import tpext
import tpext.checkpoint.dense as ckpt
from tpext.models import LlamaConfig, LlamaForCausalLM
from tpext.sharding import layouts

CFG = dict(SMALL_LLAMA, intermediate_size=80, vocab_size=101, num_key_value_heads=2)


def _dense(packed: bool = False, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG, packed=packed, tie_word_embeddings=tied))


def _meta_parallel(packed: bool, tied: bool, sp: bool = False) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CFG, packed=packed, tie_word_embeddings=tied))
    return tpext.parallelize(model, sequence_parallel=sp)


def _load_and_save(src: str, dst: str, packed: bool, tied: bool) -> None:
    model = _meta_parallel(packed, tied)
    tpext.load_checkpoint(model, src)
    assert not any(p.is_meta for p in model.parameters())
    # Small shards, so the index + several files path is the one taken.
    tpext.save_checkpoint(model, dst, max_shard_bytes=64 * 1024)


def _load_and_gather(src: str, packed: bool, tied: bool) -> dict:
    model = _meta_parallel(packed, tied, sp=True)
    tpext.load_checkpoint(model, src)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    state = tpext.gather_state_dict(model)  # collective: every rank gathers
    return state if dist.get_rank() == 1 else {}


@pytest.mark.parametrize("packed,tied", [(False, False), (True, True)])
def test_round_trip_across_tp_sizes(tmp_path, packed, tied):
    dense = _dense(packed, tied)
    original = dense.state_dict()
    tpext.save_checkpoint(dense, tmp_path / "dense.safetensors")  # no process group needed for a dense model
    run_ranks(_load_and_save, 2, str(tmp_path / "dense.safetensors"), str(tmp_path / "tp2"), packed, tied)
    index = json.loads((tmp_path / "tp2" / ckpt.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    # A tied tensor is written once (as Hugging Face does); loading finds it under either name.
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    gathered = run_ranks(_load_and_gather, 4, str(tmp_path / "tp2"), packed, tied)[1]
    assert gathered.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(gathered[name], tensor), name


class _RecordingOpen:
    """safe_open that records every read: (name, index) for slices, name for whole tensors."""

    def __init__(self, real, log):
        self.real, self.log = real, log

    def __call__(self, *args, **kwargs):
        handle = self.real(*args, **kwargs)
        log = self.log

        class Handle:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def get_tensor(self, name):
                log.append((name, "whole"))
                return self.f.get_tensor(name)

            def get_slice(self, name):
                sl = self.f.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return sl.get_shape()

                    def __getitem__(self, index):
                        out = sl[index]
                        log.append((name, out.numel()))
                        return out

                return Slice()

        return Handle()


def _reads(src: str) -> tuple[dict, dict]:
    log: list = []
    real = ckpt.safe_open
    ckpt.safe_open = _RecordingOpen(real, log)
    try:
        model = _meta_parallel(packed=True, tied=False)
        tpext.load_checkpoint(model, src)
    finally:
        ckpt.safe_open = real
    read: dict = {}
    for name, n in log:
        assert n != "whole", f"{name} was read whole"
        read[name] = read.get(name, 0) + n
    local = {e.names[0]: e.tensor.numel() for e in layouts(model)}
    return read, local


def test_shard_on_read_reads_only_the_slices(tmp_path):
    dense = _dense(packed=True)
    tpext.save_checkpoint(dense, tmp_path / "dense.safetensors")
    for rank, (read, local) in enumerate(run_ranks(_reads, 4, str(tmp_path / "dense.safetensors"))):
        assert read == local, f"rank {rank} read {read}, holds {local}"
        # A quarter of each sharded tensor (kv heads: 2 over 4 ranks, one head each), all of the norms.
        qkv = "model.layers.0.self_attn.qkv_proj.weight"
        assert read[qkv] == (8 // 4 + 2 * 1) * 8 * 64
        assert read["model.norm.weight"] == 64


def _load_expecting(src: str, strict: bool) -> str:
    with pytest.raises(ValueError) as err:
        tpext.load_checkpoint(_meta_parallel(False, False), src, strict=strict)
    return str(err.value)


def test_bad_checkpoints(tmp_path):
    state = {k: v.contiguous() for k, v in _dense().state_dict().items()}
    missing = dict(state)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    shaped = dict(state)
    shaped["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 64)
    save_file(shaped, str(tmp_path / "shape.safetensors"))
    extra = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}
    save_file(extra, str(tmp_path / "extra.safetensors"))

    msg = run_ranks(_load_expecting, 2, str(tmp_path / "missing.safetensors"), True)[0]
    assert "missing 1 tensor(s)" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    msg = run_ranks(_load_expecting, 2, str(tmp_path / "shape.safetensors"), True)[0]
    assert "'model.layers.0.self_attn.k_proj.weight' has shape [24, 64]" in msg and "[16, 64]" in msg
    msg = run_ranks(_load_expecting, 2, str(tmp_path / "extra.safetensors"), True)[0]
    assert "rotary_emb.inv_freq" in msg and "strict=False" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        ckpt.checkpoint_files(tmp_path / "empty")


def _load_lenient(src: str) -> dict:
    model = _meta_parallel(False, False)
    tpext.load_checkpoint(model, src, strict=False)
    return tpext.gather_state_dict(model)


def test_strict_false_ignores_extra_tensors(tmp_path):
    state = {k: v.contiguous() for k, v in _dense().state_dict().items()}
    save_file({**state, "unused": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    gathered = run_ranks(_load_lenient, 2, str(tmp_path / "extra.safetensors"))[0]
    assert gathered.keys() == state.keys()
    assert all(torch.equal(gathered[k], v) for k, v in state.items())


def _save_into_a_file_path(path: str) -> str:
    with pytest.raises(RuntimeError) as err:
        tpext.save_checkpoint(_meta_parallel(False, False).to_empty(device="cpu"), path)
    return str(err.value)


def test_a_failed_write_raises_on_every_rank(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    for msg in run_ranks(_save_into_a_file_path, 2, str(tmp_path / "file" / "ckpt"), timeout_s=60):
        assert "rank 0 could not write" in msg


class _WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("inv_freq", torch.ones(2), persistent=False)


def test_meta_non_persistent_buffers_are_refused(tmp_path):
    save_file(
        {"proj.weight": torch.zeros(4, 4), "proj.bias": torch.zeros(4)}, str(tmp_path / "m.safetensors")
    )
    with torch.device("meta"):
        model = _WithBuffer()
    with pytest.raises(ValueError, match=r"non-persistent buffers on the meta device \(inv_freq\)"):
        tpext.load_checkpoint(model, tmp_path / "m.safetensors")


def test_meta_model_keeps_its_real_tensors(tmp_path):
    """A meta-device model whose non-persistent buffers were created on a real device, as the error above asks:
    loading allocates the meta tensors only, and those buffers keep their values."""
    dense = _WithBuffer()
    dense.inv_freq.fill_(3.0)
    tpext.save_checkpoint(dense, tmp_path / "m.safetensors")
    with torch.device("meta"):
        model = _WithBuffer()
    model.register_buffer("inv_freq", torch.full((2,), 3.0), persistent=False)
    tpext.load_checkpoint(model, tmp_path / "m.safetensors")
    assert torch.equal(model.inv_freq, torch.full((2,), 3.0))
    assert torch.equal(model.proj.weight, dense.proj.weight) and not model.proj.weight.is_meta


def test_names_keep_a_submodule_called_module():
    outer = torch.nn.Module()
    outer.module = torch.nn.Linear(2, 2)
    assert [e.names for e in layouts(outer)] == [["module.weight"], ["module.bias"]]
    wrapped = torch.nn.Module()
    wrapped._orig_mod = outer  # what torch.compile's wrapper looks like
    assert [e.names for e in layouts(wrapped)] == [["module.weight"], ["module.bias"]]
