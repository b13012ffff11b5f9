"""torch.distributed.checkpoint (DCP) on tensor-parallel models and their optimizers, the standard flow
(get_state_dict -> dcp.save -> dcp.load -> set_state_dict), against one dense fp64 process:

* save at dp=2 x tp=2 (DDP over dp; FSDP2 over dp), load at tp=4 and at tp=3 (uneven splits, GQA kv heads
  replicated at tp 4 > 2 kv heads, packed qkv / gate_up, vocab-parallel embedding + lm_head, tied or not),
  and into the dense model on one process with no process group (no_dist=True);
* weights and AdamW state (exp_avg, exp_avg_sq, step) equal the dense run's, bit for bit against the
  checkpoint and to rounding against the dense training; the resumed step equals the one never stopped
  (bitwise at the same tp, to rounding at another); SGD momentum likewise;
* every tensor is written once, with the dense keys and shapes (dp replicas and replicated kv heads deduped);
* what cannot be right is refused: a per-rank torch.save loaded at another tp size, another architecture's
  checkpoint (the key is named).
"""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dist import run_ranks
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

import tpext
from tpext.checkpoint import ShardedState
from tpext.models import LlamaConfig, LlamaForCausalLM
from tpext.sharding import ShardLayout, layouts

# vocab 101 and intermediate 80 split unevenly at tp 3 (and the vocab at 2 and 4); 2 kv heads are replicated
# at tp 4, 1 kv head at every tp > 1 (tp 3 needs it: 2 kv heads cannot be split or replicated over 3 ranks).
CFG = dict(hidden_size=48, intermediate_size=80, vocab_size=101, num_hidden_layers=2, num_attention_heads=12)
BATCH, SEQ, LR = 4, 12, 1e-2  # SEQ divisible by every tp (sequence parallel)


def _dense(packed: bool, tied: bool, kv: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**CFG, num_key_value_heads=kv, packed=packed, tie_word_embeddings=tied)
    return LlamaForCausalLM(config, dtype=torch.float64)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(
        0, CFG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step)
    )


def _optimizer(params, kind: str) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _step(model, loss_of, opt, step: int, dp_rank: int = 0, dp: int = 1) -> None:
    rows = BATCH // dp
    ids = _batch(step)[dp_rank * rows : (dp_rank + 1) * rows]
    loss_of(model(ids), ids).backward()
    opt.step()
    opt.zero_grad()


def _dense_run(arch: tuple, kind: str, steps: int):
    """The dense model and optimizer after `steps` steps on the whole batch."""
    model = _dense(*arch)
    opt = _optimizer(model.parameters(), kind)
    for s in range(steps):
        _step(model, model.loss, opt, s)
    return model, opt


def _wrap(model, mesh, wrapper: str):
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh["dp"])
    return model


def _dp_tp_model(arch, sp, wrapper, mesh):
    model = tpext.parallelize(_dense(*arch), mesh["tp"], sequence_parallel=sp)
    return _wrap(model, mesh, wrapper), model.loss


def _local_optim_state(model, opt) -> dict:
    """{(param name, state key): this rank's tensor} of the optimizer (DTensors as their local part)."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    names = {id(p): n.removeprefix("module.") if ddp else n for n, p in model.named_parameters()}
    out = {}
    for p, state in opt.state.items():
        for k, v in state.items():
            out[(names[id(p)], k)] = (v.to_local() if hasattr(v, "to_local") else v).clone()
    return out


def _save_dp_tp(path: str, arch: tuple, sp: bool, wrapper: str, kind: str, steps: int):
    """dp=2 x tp=2: train `steps` steps, save with DCP; then one more step continuing, and one more step
    from a fresh model loaded from the checkpoint: both gathered, for a bitwise comparison."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()
    model, loss_of = _dp_tp_model(arch, sp, wrapper, mesh)
    opt = _optimizer(model.parameters(), kind)
    for s in range(steps):
        _step(model, loss_of, opt, s, dp_rank, 2)
    model_sd, optim_sd = get_state_dict(model, opt)
    sharded = sorted(k for k, v in model_sd.items() if isinstance(v, ShardedState))
    assert sharded and all(k in model_sd for k in sharded), sharded
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    saved_layouts = {name: e.layout for e in layouts(model) for name in e.names}
    saved_optim = _local_optim_state(model, opt)

    _step(model, loss_of, opt, steps, dp_rank, 2)
    continued = tpext.gather_state_dict(model)

    fresh, fresh_loss = _dp_tp_model(arch, sp, wrapper, mesh)
    fresh_opt = _optimizer(fresh.parameters(), kind)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    restored_optim = _local_optim_state(fresh, fresh_opt)
    assert restored_optim.keys() == saved_optim.keys()
    for key, want in saved_optim.items():
        assert torch.equal(restored_optim[key], want), f"restored optimizer state {key}"
    _step(fresh, fresh_loss, fresh_opt, steps, dp_rank, 2)
    resumed = tpext.gather_state_dict(fresh)
    return saved_layouts, saved_optim, continued, resumed


def _load_tp(path: str, arch: tuple, sp: bool, kind: str, steps: int):
    """Plain tp over the world: load the checkpoint, report weights and optimizer state, take one step."""
    model = tpext.parallelize(_dense(*arch), sequence_parallel=sp)
    opt = _optimizer(model.parameters(), kind)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = tpext.gather_state_dict(model)
    optim_local = _local_optim_state(model, opt)
    model_layouts = {name: e.layout for e in layouts(model) for name in e.names}
    _step(model, model.loss, opt, steps)
    return loaded, optim_local, model_layouts, tpext.gather_state_dict(model)


def _dense_from_checkpoint(path: str, arch: tuple, kind: str):
    """No process group: the dense model and a dense optimizer filled from the checkpoint."""
    model = _dense(*arch)
    opt = _optimizer(model.parameters(), kind)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return model, opt


def _dense_optim_state(model, opt) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {(names[id(p)], k): v for p, state in opt.state.items() for k, v in state.items()}


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


# (packed qkv / gate_up, tied embedding, kv heads), sequence parallel, dp wrapper, optimizer, tp sizes to load at
@pytest.mark.parametrize(
    "arch,sp,wrapper,kind,tps",
    [
        ((False, False, 2), False, "ddp", "adamw", (4,)),
        ((True, True, 2), True, "ddp", "adamw", (4,)),
        ((True, False, 2), True, "fsdp2", "adamw", (4,)),
        ((False, True, 1), False, "ddp", "sgd", (3, 1)),
    ],
)
def test_save_dp2_tp2_load_other_tp_and_dense(tmp_path, arch, sp, wrapper, kind, tps):
    path, steps = str(tmp_path / "ckpt"), 2
    results = run_ranks(_save_dp_tp, 4, path, arch, sp, wrapper, kind, steps)
    ref_model, ref_opt = _dense_run(arch, kind, steps)
    ref_next, _ = _dense_run(arch, kind, steps + 1)  # the run that never stopped

    # The checkpoint: the dense keys and shapes, every element written once, data parallel or not.
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    dense_state = ref_model.state_dict()
    for name, tensor in dense_state.items():
        entry = md[f"model.{name}"]
        assert tuple(entry.size) == tuple(tensor.shape), name
        assert sum(c.sizes.numel() for c in entry.chunks) == tensor.numel(), f"{name} written more than once"
    data_bytes = sum(os.path.getsize(f) for f in glob.glob(f"{path}/*.distcp"))
    state_bytes = sum(t.numel() * 8 for t in dense_state.values()) * (3 if kind == "adamw" else 2)
    # Not one copy per dp replica (2x); the rest is DCP's framing of each chunk (a small torch.save each).
    assert data_bytes < 1.5 * state_bytes, (data_bytes, state_bytes)

    # Dense, one process, no process group: what the tp=2 ranks held, bit for bit; the dense run to rounding.
    model, opt = _dense_from_checkpoint(path, arch, kind)
    loaded, loaded_optim = model.state_dict(), _dense_optim_state(model, opt)
    for rank, (saved_layouts, saved_optim, continued, resumed) in enumerate(results):
        for (name, k), local in saved_optim.items():
            dense = loaded_optim[(name, k)]
            want = saved_layouts[name].local_from_dense(dense) if dense.dim() else dense
            if wrapper == "fsdp2" and want.dim():  # FSDP2: this dp rank's rows (torch.chunk) of its tp slice
                chunks = torch.chunk(want, 2)
                want = chunks[rank // 2] if rank // 2 < len(chunks) else want[:0]
            assert torch.equal(local, want), f"rank {rank}: optimizer {k} of {name}"
        for name in dense_state:
            assert torch.equal(continued[name], resumed[name]), f"rank {rank}: resumed step differs on {name}"
    for name, tensor in dense_state.items():
        _close(loaded[name], tensor, f"dense load {name}")
    ref_optim = _dense_optim_state(ref_model, ref_opt)
    assert loaded_optim.keys() == ref_optim.keys()
    for key, tensor in ref_optim.items():
        _close(loaded_optim[key], tensor, f"dense load optimizer {key}")

    # Another tp size: the weights and optimizer state of the checkpoint, in this rank's slices; the next step.
    for tp in tps:
        for rank, (got, optim_local, model_layouts, stepped) in enumerate(
            run_ranks(_load_tp, tp, path, arch, sp, kind, steps)
        ):
            for name, tensor in loaded.items():
                assert torch.equal(got[name], tensor), f"tp={tp} rank {rank}: {name}"
            for (name, k), local in optim_local.items():
                dense = loaded_optim[(name, k)]
                want = model_layouts[name].local_from_dense(dense) if dense.dim() else dense
                assert torch.equal(local, want), f"tp={tp} rank {rank}: optimizer {k} of {name}"
            for name, tensor in ref_next.state_dict().items():
                _close(stepped[name], tensor, f"tp={tp} rank {rank}: resumed step {name}")


def _per_rank_save(path: str) -> None:
    """torch.save(model.state_dict()) per rank at tp=2: each file holds that rank's slices, with their layout."""
    model = tpext.parallelize(_dense(False, False))
    torch.save(model.state_dict(), f"{path}/rank{dist.get_rank()}.pt")
    # The plain model.state_dict(), no get_state_dict; async_save stages a CPU copy of each ShardedState.
    dcp.async_save(model.state_dict(), checkpoint_id=f"{path}/dcp").result()


def _per_rank_load(path: str) -> tuple[str, bool]:
    """Load rank (r % 2)'s file: at tp=2 it is this rank's own; at tp=4 it must be refused, naming the key."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tpext.parallelize(_dense(False, False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    state = torch.load(f"{path}/rank{rank % 2}.pt")  # weights_only: ShardedState is an allowed global
    try:
        model.load_state_dict(state)
    except ValueError as err:
        return str(err), False
    reloaded = tpext.gather_state_dict(model)
    assert world == 2
    fresh = tpext.parallelize(_dense(False, False))
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    dcp_state = fresh.state_dict()
    dcp.load(dcp_state, checkpoint_id=f"{path}/dcp")
    fresh.load_state_dict(dcp_state)
    dense = _dense(False, False).state_dict()
    from_dcp = tpext.gather_state_dict(fresh)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(dense)  # a dense state dict: each rank takes its slices
    from_dense = tpext.gather_state_dict(fresh)
    assert all(torch.equal(from_dense[k], v) for k, v in dense.items())
    same = all(torch.equal(reloaded[k], v) and torch.equal(from_dcp[k], v) for k, v in dense.items())
    return "", same


def test_per_rank_torch_save_refused_at_another_tp(tmp_path):
    run_ranks(_per_rank_save, 2, str(tmp_path))
    for message, same in run_ranks(
        _per_rank_load, 2, str(tmp_path)
    ):  # same tp, same rank: loads, bit for bit
        assert message == "" and same
    for rank, (message, _) in enumerate(run_ranks(_per_rank_load, 4, str(tmp_path))):
        assert "model.embed_tokens.weight" in message, f"rank {rank}: {message}"
        assert "per-rank save" in message and "dcp.save" in message, message


def _other_architecture(path: str, config: dict) -> str:
    torch.manual_seed(0)
    model = tpext.parallelize(LlamaForCausalLM(LlamaConfig(**config), dtype=torch.float64))
    if config.get("intermediate_size") == 80 and not config.get("qk_norm"):
        dcp.save(get_state_dict(model, [])[0], checkpoint_id=path)
        return ""
    try:
        dcp.load(get_state_dict(model, [])[0], checkpoint_id=path)
    except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; its message is the point
        return str(err)
    return "loaded"


def test_other_architecture_names_the_key(tmp_path):
    base = dict(CFG, num_key_value_heads=2)
    run_ranks(_other_architecture, 2, str(tmp_path), base)
    wider = run_ranks(_other_architecture, 2, str(tmp_path), dict(base, intermediate_size=96))
    mlp_weight = r"Size mismatch .* for model\.layers\.\d\.mlp\.\w+_proj\.weight"
    assert all(re.search(mlp_weight, m) for m in wider), wider[0]
    qk_norm = run_ranks(_other_architecture, 2, str(tmp_path), dict(base, qk_norm=True))
    norm_weight = r"Missing key .*: model\.layers\.\d\.self_attn\.[qk]_norm\.weight"
    assert all(re.search(norm_weight, m) for m in qk_norm), qk_norm[0]


def _assert_chunks(layout: ShardLayout, window, want) -> None:
    """ShardedState's DCP chunk protocol: the chunks it lists (dense offsets, sizes), and for each the view
    of the local tensor it hands out, ``local.narrow(dim, start, length)``: want is a tuple of
    (offsets, sizes, dim, start, length)."""
    rows = window[1] if window is not None else layout.local_shape[0]
    shape = (rows, *layout.local_shape[1:])
    local = torch.arange(float(torch.Size(shape).numel())).view(shape)  # every element tells where it sits
    state = ShardedState(local, layout, window)
    listed = [(tuple(c.offsets), tuple(c.sizes)) for c in state.__create_chunk_list__()]
    assert listed == [(offsets, sizes) for offsets, sizes, *_ in want]
    for offsets, _, dim, start, length in want:
        view = state.__get_tensor_shard__(MetadataIndex("w", torch.Size(offsets)))
        expected = local.narrow(dim, start, length)
        assert torch.equal(view, expected), (offsets, view, expected)
        assert view.data_ptr() == expected.data_ptr(), "DCP's load must copy straight into the local tensor"


def test_chunks_of_packed_layout_under_fsdp2_rows():
    # Packed [q 4 | k 2 | v 2] rows, this rank holding q 2..3, k 1, v 1 (local rows 0..3); FSDP2 keeps rows 1..2.
    layout = ShardLayout((8, 3), 0, ((2, 2), (5, 1), (7, 1)))
    _assert_chunks(
        layout,
        None,
        (
            ((2, 0), (2, 3), 0, 0, 2),
            ((5, 0), (1, 3), 0, 2, 1),
            ((7, 0), (1, 3), 0, 3, 1),
        ),
    )
    _assert_chunks(layout, (1, 2), (((3, 0), (1, 3), 0, 0, 1), ((5, 0), (1, 3), 0, 1, 1)))
    row_parallel = ShardLayout((4, 6), 1, ((3, 3),))  # [out, in/R] under FSDP2's rows 2..3
    _assert_chunks(row_parallel, (2, 2), (((2, 3), (2, 3), 1, 0, 3),))


def test_sharded_state_moves_and_refuses_math():
    layout = ShardLayout((5, 2), 0, ((3, 2),))
    local = torch.arange(4.0).view(2, 2)
    state = ShardedState(local, layout)
    assert state.shape == (5, 2) and torch.equal(state.detach().to(torch.float64).local, local.double())
    dense = torch.arange(10.0).view(5, 2)
    state.copy_(dense)  # a dense tensor: this rank's slice of it
    assert torch.equal(local, dense[3:])
    with pytest.raises(NotImplementedError, match=r"aten.add.Tensor on a ShardedState.*\.local"):
        state + 1
    with pytest.raises(
        NotImplementedError, match=r"into a plain tensor: the dense tensor is not on this rank"
    ):
        torch.zeros(5, 2).copy_(state)


def _hf_save(path: str, arch: str) -> None:
    from test_hf_models import _model

    model = tpext.parallelize(_model(arch, 2, "sdpa"), sequence_parallel=True)
    state = get_model_state_dict(model)
    assert isinstance(state["model.embed_tokens.weight"], ShardedState)
    dcp.save(state, checkpoint_id=f"{path}/dcp")


def _hf_load(path: str, arch: str) -> list[dict]:
    """Into a parallelized Hugging Face model at tp=4: from the tp=2 DCP checkpoint, and (no experts) from
    the dense safetensors save_pretrained wrote, with torch's HuggingFaceStorageReader."""
    from test_hf_models import _model

    model = tpext.parallelize(_model(arch, 2, "sdpa"))
    readers = [dict(checkpoint_id=f"{path}/dcp")]
    if (
        arch != "qwen2_moe"
    ):  # transformers writes MoE experts one by one, under other names than the fused ones
        readers.append(
            dict(
                storage_reader=HuggingFaceStorageReader(f"{path}/hf"),
                planner=DefaultLoadPlanner(allow_partial_load=True),
            )
        )  # a tied lm_head is not on disk
    out = []
    for reader in readers:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        state = get_model_state_dict(model)
        dcp.load(state, **reader)
        set_model_state_dict(model, state)
        out.append(tpext.gather_state_dict(model))
    return out


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3"])
def test_hugging_face_models(tmp_path, arch):
    pytest.importorskip("transformers")
    from test_hf_models import _model

    dense = _model(arch, 2, "sdpa")
    dense.save_pretrained(tmp_path / "hf")
    run_ranks(_hf_save, 2, str(tmp_path), arch)
    for got in run_ranks(_hf_load, 4, str(tmp_path), arch)[0]:
        for name, tensor in dense.state_dict().items():
            assert torch.equal(got[name], tensor), f"{arch}: {name}"


def _hf_writer_save(path: str, packed: bool, distributed: bool = True) -> str:
    """dcp.save into torch's HuggingFaceStorageWriter at tp=2: refused for packed qkv / gate_up (several chunks
    of one key on a rank) and without save_distributed (every rank's file has the same name), written and
    consolidated into the dense safetensors otherwise."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    model = tpext.parallelize(_dense(packed, False))
    writer = HuggingFaceStorageWriter(path, save_distributed=distributed, enable_consolidation=distributed)
    try:
        dcp.save(get_model_state_dict(model), storage_writer=writer)
    except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; its message is the point
        return str(err)
    return ""


@pytest.mark.parametrize("packed", [True, False])
def test_hugging_face_storage_writer_refuses_several_chunks_of_a_key(tmp_path, packed):
    from safetensors.torch import load_file

    messages = run_ranks(_hf_writer_save, 2, str(tmp_path), packed)
    dense = _dense(packed, False).state_dict()
    if packed:
        for rank, message in enumerate(messages):
            assert re.search(
                r"rank \d holds \d chunks of 'model\.layers\.\d\.(self_attn\.qkv_proj|mlp\.gate_up_proj)"
                r"\.weight'",
                message,
            ), f"rank {rank}: {message}"
            assert "dcp.save(state, checkpoint_id=dir)" in message and "tpext.save_checkpoint" in message
        assert not glob.glob(f"{tmp_path}/**/*.safetensors", recursive=True)  # refused before any file
        return
    assert messages == ["", ""], messages
    for rank, message in enumerate(run_ranks(_hf_writer_save, 2, f"{tmp_path}/collide", packed, False)):
        assert re.search(
            r"save_distributed=False\) gives every rank the same file names, but ranks \[0, 1\]", message
        ), f"rank {rank}: {message}"
    saved = {}
    for f in glob.glob(f"{tmp_path}/*.safetensors"):
        saved.update(load_file(f))
    assert set(saved) == set(dense)
    for name, tensor in dense.items():
        assert torch.equal(saved[name], tensor), name


def _common_workflows(path: str) -> dict:
    """What users do with model.state_dict() besides DCP, at tp=2 on a packed model with AdamW state: each
    either gives this rank's exact tensors back, or is refused naming the key and the way out."""
    import copy

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    dense = _dense(True, False).state_dict()
    model = tpext.parallelize(_dense(True, False))
    opt = _optimizer(model.parameters(), "adamw")
    _step(model, model.loss, opt, 0)
    want_optim = _local_optim_state(model, opt)

    def zeroed():
        fresh = tpext.parallelize(_dense(True, False))
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        return fresh

    def same_as(state) -> bool:  # load into a zeroed model, gather, compare with the trained model
        fresh = zeroed()
        fresh.load_state_dict(state)
        got, want = tpext.gather_state_dict(fresh), tpext.gather_state_dict(model)
        return all(torch.equal(got[k], v) for k, v in want.items())

    out = {
        "deepcopy": same_as(copy.deepcopy(model.state_dict())),
        "clone": same_as({k: v.clone() for k, v in model.state_dict().items()}),
        # the check can fail: a round trip through fp32 loses bits
        "lossy_told": not same_as(
            {k: v.to(torch.float32).to(torch.float64) for k, v in model.state_dict().items()}
        ),
    }
    before = tpext.gather_state_dict(model)
    model.load_state_dict(model.state_dict())  # onto itself: unchanged
    out["self_load"] = all(torch.equal(v, before[k]) for k, v in tpext.gather_state_dict(model).items())
    rank_file = f"{path}/rank{dist.get_rank()}.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, rank_file)
    loaded = torch.load(rank_file)
    out["torch_save"] = same_as(loaded["model"])
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # the optimizer's own state, through its hooks
    opt.load_state_dict(loaded["optim"])
    got_optim = _local_optim_state(model, opt)
    out["optim_roundtrip"] = all(torch.equal(got_optim[k], v) for k, v in want_optim.items())
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ema["model.embed_tokens.weight"].mul_(0.9)
    except NotImplementedError as err:
        out["ema"] = str(err)
    compiled = torch.compile(zeroed())  # state dicts of the wrapper: the _orig_mod. keys, the same entries
    compiled.load_state_dict({f"_orig_mod.{k}": v for k, v in model.state_dict().items()})
    out["compiled"] = all(
        torch.equal(a, b)
        for a, b in zip(tpext.gather_state_dict(compiled).values(), tpext.gather_state_dict(model).values())
    )
    out["compiled_keys"] = sorted(get_model_state_dict(compiled)) == sorted(dense)
    full = StateDictOptions(full_state_dict=True)
    for what, call in [
        ("full_model", lambda: get_model_state_dict(model, options=full)),
        (
            "full_model_cpu",
            lambda: get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            ),
        ),
        ("full_optim", lambda: get_optimizer_state_dict(model, opt, options=full)),
    ]:
        try:
            call()
            out[what] = "not refused"
        except ValueError as err:
            out[what] = str(err)
    copied = copy.deepcopy(
        model
    )  # its state_dict() never called: get_optimizer_state_dict must still know it
    copied_opt = _optimizer(copied.parameters(), "adamw")
    _step(copied, copied.loss, copied_opt, 1)
    copied_state = get_optimizer_state_dict(copied, copied_opt)["state"]["model.embed_tokens.weight"]
    out["deepcopy_optim"] = isinstance(copied_state["exp_avg"], ShardedState)
    cpu = get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))  # not full: slices, on CPU
    out["cpu_offload"] = same_as(cpu) and isinstance(cpu["model.embed_tokens.weight"], ShardedState)
    resumed = zeroed()  # a fresh model and optimizer (never stepped) resumed from the per-rank files
    resumed.load_state_dict(loaded["model"])
    resumed_opt = _optimizer(resumed.parameters(), "adamw")
    resumed_opt.load_state_dict(torch.load(rank_file)["optim"])  # its own tensors: `opt` holds loaded's
    _step(resumed, resumed.loss, resumed_opt, 5)
    _step(model, model.loss, opt, 5)
    got, want = tpext.gather_state_dict(resumed), tpext.gather_state_dict(model)
    out["resumed_step"] = all(torch.equal(got[k], v) for k, v in want.items())
    dense_model, dense_opt = _dense_run((True, False), "adamw", 1)  # a dense run's optimizer, resumed at tp=2
    from_dense = tpext.parallelize(_dense(True, False))
    from_dense.load_state_dict(dense_model.state_dict())
    from_dense_opt = _optimizer(from_dense.parameters(), "adamw")
    from_dense_opt.load_state_dict(copy.deepcopy(dense_opt.state_dict()))  # torch aliases loaded tensors
    _step(from_dense, from_dense.loss, from_dense_opt, 1)
    _step(dense_model, dense_model.loss, dense_opt, 1)
    got = tpext.gather_state_dict(from_dense)
    for k, v in dense_model.state_dict().items():
        _close(got[k], v, f"resumed from a dense optimizer: {k}")
    return out


def test_common_state_dict_workflows(tmp_path):
    for rank, out in enumerate(run_ranks(_common_workflows, 2, str(tmp_path))):
        for what in (
            "deepcopy",
            "clone",
            "lossy_told",
            "self_load",
            "torch_save",
            "optim_roundtrip",
            "compiled",
            "compiled_keys",
            "cpu_offload",
            "deepcopy_optim",
            "resumed_step",
        ):
            assert out[what] is True, f"rank {rank}: {what}"
        assert "aten.mul_.Tensor on a ShardedState" in out["ema"] and ".local" in out["ema"], out["ema"]
        for what in ("full_model", "full_model_cpu"):
            assert re.search(r"full_state_dict=True cannot gather 'model\.[\w.]+weight'", out[what]), out[
                what
            ]
            assert "tpext.gather_state_dict(model)" in out[what] and "dcp.save" in out[what]
        assert "full_state_dict=True cannot gather 'state." in out["full_optim"], out["full_optim"]
