"""tpext.parallel.wrappers: a DDP or FSDP2 wrapper over ranks of one tensor-parallel group is refused at
forward; over the data-parallel group it runs."""

from __future__ import annotations

import pytest
import torch
from dist import CaseBatches
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import tpext

# (wrapper, over which ranks) -> whether its forward is refused; 4 ranks: dp=2 x tp=2.
_CASES = {
    ("ddp", "world"): True,
    ("ddp", "dp"): False,
    ("fsdp", "world"): True,
    ("fsdp", "dp"): False,
}


def _wrapped_forward(wrapper: str, over: str) -> tuple[str, str]:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    tpext.parallelize(model, group=mesh["tp"], plan={"0": "colwise", "2": "rowwise"})
    if wrapper == "ddp":
        model = DistributedDataParallel(
            model, process_group=None if over == "world" else mesh["dp"].get_group()
        )
    else:
        fully_shard(model, mesh=init_device_mesh("cpu", (4,)) if over == "world" else mesh["dp"])
    try:
        model(torch.randn(2, 8)).sum().backward()
    except ValueError as exc:
        return "raised", str(exc)
    return "ok", ""


batches = CaseBatches.fixture(_wrapped_forward, {4: list(_CASES)})


@pytest.mark.slow
@pytest.mark.parametrize(("wrapper", "over"), list(_CASES), ids=lambda v: v)
def test_wrapper_over_the_tensor_parallel_ranks_is_refused(batches, wrapper, over):
    for status, message in batches.result(4, (wrapper, over)):
        if _CASES[(wrapper, over)]:
            assert status == "raised", f"{wrapper} over {over}: no error"
            assert "tensor-parallel group" in message and "mesh['dp']" in message, message
        else:
            assert status == "ok", message
