"""TP x DP on a 2-D DeviceMesh ("dp", "tp"): the model parallelized on "tp" composes with DDP or FSDP2
(`fully_shard`) on "dp". Five AdamW steps on 4 ranks (dp=2, tp=2) give the loss curve and the weights of
one dense process on the whole batch (weights through gather_state_dict, which sees through both wrappers),
and a saved checkpoint loads back into a freshly wrapped model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from dist import SMALL_LLAMA, run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import tpext
from tpext.models import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(**dict(SMALL_LLAMA, num_key_value_heads=2), tie_word_embeddings=True)
STEPS, BATCH, SEQ = 5, 4, 8


def _batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def _train(model, loss_of, batches, group=None) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for ids in batches:
        loss = loss_of(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if group is not None:  # the mean over the data-parallel ranks' equal-sized batches
            dist.all_reduce(loss, group=group)
            loss /= group.size()
        losses.append(loss.item())
    return losses


def _tp_dp(wrapper: str, sp: bool, ckpt_dir: str) -> tuple[list[float], list[float], float]:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    dense = LlamaForCausalLM(CFG, dtype=torch.float64)
    trained = copy.deepcopy(dense)
    reference = _train(trained, trained.loss, _batches())

    model = tpext.parallelize(dense, mesh["tp"], sequence_parallel=sp)
    loss_of = model.loss
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    else:
        fully_shard(model, mesh=mesh["dp"])
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    rows = BATCH // dp
    local = [ids[dp_rank * rows : (dp_rank + 1) * rows] for ids in _batches()]
    losses = _train(model, loss_of, local, mesh["dp"].get_group())
    gathered, want = tpext.gather_state_dict(model), trained.state_dict()
    assert gathered.keys() == want.keys()
    worst = max(float(((gathered[k] - v).abs() / v.abs().clamp_min(1e-3)).max()) for k, v in want.items())

    # Resume: save, then load into a freshly wrapped model (FSDP2: into its data-parallel shards).
    tpext.save_checkpoint(model, ckpt_dir)
    fresh = tpext.parallelize(LlamaForCausalLM(CFG, dtype=torch.float64), mesh["tp"], sequence_parallel=sp)
    if wrapper == "ddp":
        fresh = torch.nn.parallel.DistributedDataParallel(fresh, process_group=mesh["dp"].get_group())
    else:
        fully_shard(fresh, mesh=mesh["dp"])
    tpext.load_checkpoint(fresh, ckpt_dir)
    reloaded = tpext.gather_state_dict(fresh)
    assert all(torch.equal(reloaded[k], gathered[k]) for k in gathered), "reloaded weights differ"
    return losses, reference, worst


@pytest.mark.parametrize("wrapper,sp", [("ddp", False), ("fsdp2", True)])
def test_tp_dp_loss_curve_matches_dense(wrapper, sp, tmp_path):
    for rank, (losses, reference, weight_err) in enumerate(run_ranks(_tp_dp, 4, wrapper, sp, str(tmp_path))):
        assert losses == pytest.approx(reference, rel=1e-10), f"rank {rank}: {losses} vs dense {reference}"
        assert reference[-1] < reference[0]  # it trains
        assert weight_err < 1e-8, (
            f"rank {rank}: trained weights differ from dense by {weight_err:.1e} (relative)"
        )
