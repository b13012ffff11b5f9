"""The runtime schedule policy (tpext/ops/schedule.py): chunk counts and algorithms, pure functions of
shapes and device; its old names in tpext.planner; and that the schedules of tpext.nn layers and of
chunks="auto" reach the ops."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from dist import run_ranks

import tpext
from tpext.nn import RowParallelLinear
from tpext.ops import Algorithm, Schedule, auto_schedule, default_algorithm, resolve_schedule


def test_planner_re_exports_the_policy():
    # Users call tpext.planner.auto_schedule / .Algorithm: the policy moved beside the ops, the names stay.
    import tpext.planner as planner
    from tpext.ops import schedule

    assert "auto_schedule" in schedule.__all__ and "Algorithm" in schedule.__all__
    for name in schedule.__all__:
        assert getattr(tpext.ops, name) is getattr(schedule, name), name
    for name in (*schedule.__all__, "MIN_ROWS_PER_CHUNK"):
        assert getattr(planner, name) is getattr(schedule, name), name


def test_algorithm_values_match_the_op_schema():
    # csrc/schedule/schedule.h: kSequential = 0, kChunkedPipeline = 1, kChunkedTwoStreams = 2.
    assert [int(a) for a in Algorithm] == [0, 1, 2]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_auto_is_sequential_for_one_rank_or_few_rows(device):
    assert auto_schedule(1 << 20, 1, device) == Schedule(1, Algorithm.SEQUENTIAL)
    assert auto_schedule(8, 4, device) == Schedule(1, Algorithm.SEQUENTIAL)


def test_auto_pipelines_large_gemms_on_the_device_pipeline():
    assert auto_schedule(2048, 2, "cpu") == Schedule(4, Algorithm.CHUNKED_PIPELINE)
    # On CPU each chunk must move >= 1 MiB: gloo's per-collective latency is paid once per chunk.
    assert auto_schedule(2048, 2, "cpu", row_bytes=4096) == Schedule(4, Algorithm.CHUNKED_PIPELINE)  # 8 MiB
    assert auto_schedule(2048, 2, "cpu", row_bytes=1024) == Schedule(2, Algorithm.CHUNKED_PIPELINE)  # 2 MiB
    assert auto_schedule(1024, 2, "cpu", row_bytes=512) == Schedule(1, Algorithm.SEQUENTIAL)  # 512 KiB
    assert auto_schedule(8192, 8, "cuda", row_bytes=16) == Schedule(4, Algorithm.CHUNKED_TWO_STREAMS)
    assert auto_schedule(8192, 8, "cuda") == Schedule(4, Algorithm.CHUNKED_TWO_STREAMS)
    assert auto_schedule(2048, 8, "cuda") == Schedule(2, Algorithm.CHUNKED_TWO_STREAMS)


def test_explicit_values_override_the_heuristic():
    assert resolve_schedule(3, "auto", 10, 2, "cpu") == Schedule(3, Algorithm.CHUNKED_PIPELINE)
    assert resolve_schedule(3, "auto", 10, 2, "cuda") == Schedule(3, Algorithm.CHUNKED_TWO_STREAMS)
    assert resolve_schedule(1, "auto", 1 << 20, 8, "cuda") == Schedule(1, Algorithm.SEQUENTIAL)
    assert resolve_schedule("auto", Algorithm.SEQUENTIAL, 1 << 20, 8, "cuda") == Schedule(
        1, Algorithm.SEQUENTIAL
    )
    assert resolve_schedule("auto", Algorithm.CHUNKED_PIPELINE, 8192, 8, "cuda") == Schedule(
        4, Algorithm.CHUNKED_PIPELINE
    )
    assert resolve_schedule(5, 2, 10, 2, "cpu") == Schedule(5, 2)
    # Out-of-range ints pass through: the op itself rejects them with its own message (test_op_errors).
    assert resolve_schedule(0, 7, 10, 2, "cpu") == Schedule(0, 7)
    assert default_algorithm(2, "cpu") is Algorithm.CHUNKED_PIPELINE


@pytest.mark.parametrize(
    "chunks, algorithm, what",
    [("many", "auto", "chunks"), (2, "fast", "algorithm"), (2.0, "auto", "chunks"), (True, "auto", "chunks")],
)
def test_bad_schedule_arguments(chunks, algorithm, what):
    with pytest.raises(ValueError, match=rf"tpext: {what} must be 'auto' or an int, got"):
        resolve_schedule(chunks, algorithm, 10, 2)


def _check_schedules_reach_the_ops() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(8, 6, dtype=torch.float64)
    x = torch.randn(600, 8, dtype=torch.float64)
    want = dense(x)
    layer = RowParallelLinear.from_dense(dense, input_is_parallel=False, chunks="auto")
    for algorithm in ("auto", *Algorithm):
        layer.algorithm = algorithm
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12, msg=f"algorithm={algorithm}")
    w_shard = dense.weight[:, tdist.get_rank() * 4 : (tdist.get_rank() + 1) * 4]
    y = tpext.ops.gemm_all_reduce(
        x[:, tdist.get_rank() * 4 : (tdist.get_rank() + 1) * 4], w_shard, chunks="auto"
    )
    torch.testing.assert_close(y, x @ dense.weight.T, rtol=1e-12, atol=1e-12)
    # The wrappers' default is chunks="auto" too (README): the same result.
    y = tpext.ops.gemm_all_reduce(x[:, tdist.get_rank() * 4 : (tdist.get_rank() + 1) * 4], w_shard)
    torch.testing.assert_close(y, x @ dense.weight.T, rtol=1e-12, atol=1e-12)


def test_module_override_and_auto_chunks_reach_the_ops():
    run_ranks(_check_schedules_reach_the_ops, 2)
