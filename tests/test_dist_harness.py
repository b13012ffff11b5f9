"""tests/dist.py itself: results in rank order, failures relayed with the rank's traceback, no hangs."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as tdist
from dist import DistFailure, run_ranks

GROUP_TIMEOUT_S = 3.0


def _whoami():
    return tdist.get_rank(), tdist.get_world_size(), torch.get_num_threads()


def test_results_come_back_in_rank_order():
    assert run_ranks(_whoami, 3) == [(0, 3, 1), (1, 3, 1), (2, 3, 1)]


def _rank1_never_joins():
    if tdist.get_rank() == 0:
        tdist.all_reduce(torch.ones(4))  # rank 1 never calls it: gloo gives up at the group timeout


def test_rank_that_never_joins_fails_within_the_group_timeout():
    start = time.monotonic()
    with pytest.raises(DistFailure, match=r"rank 0 of 2 failed while running _rank1_never_joins") as info:
        run_ranks(_rank1_never_joins, 2, group_timeout_s=GROUP_TIMEOUT_S, timeout_s=60)
    elapsed = time.monotonic() - start
    assert "all_reduce" in str(info.value)  # the failing rank's own traceback
    assert elapsed < 30, f"took {elapsed:.1f}s to notice a missing rank (group timeout {GROUP_TIMEOUT_S}s)"


def _rank1_raises():
    if tdist.get_rank() == 1:
        raise ValueError("bad thing on rank 1")
    tdist.barrier()  # rank 0 waits for the failed rank: the harness must kill it, not wait


def test_failing_rank_traceback_is_shown_and_peers_are_killed():
    start = time.monotonic()
    with pytest.raises(DistFailure, match=r"rank 1 of 2 failed") as info:
        run_ranks(_rank1_raises, 2, group_timeout_s=60.0, timeout_s=60)
    assert "ValueError: bad thing on rank 1" in str(info.value)
    assert "_rank1_raises" in str(info.value)
    assert time.monotonic() - start < 20  # did not wait for rank 0's 60 s group timeout


def _rank0_dies():
    if tdist.get_rank() == 0:
        os._exit(3)
    tdist.barrier()


def test_dead_rank_is_reported_with_its_exit_code():
    with pytest.raises(DistFailure, match=r"rank 0 exit code 3"):
        run_ranks(_rank0_dies, 2, group_timeout_s=60.0, timeout_s=60)


def _sleep_forever():
    time.sleep(3600)


def test_harness_timeout_kills_stuck_ranks():
    start = time.monotonic()
    with pytest.raises(DistFailure, match=r"did not finish within 2s"):
        run_ranks(_sleep_forever, 2, group_timeout_s=GROUP_TIMEOUT_S, timeout_s=2)
    assert time.monotonic() - start < 15


def test_pool_recovers_after_a_failure():
    with pytest.raises(DistFailure):
        run_ranks(_rank1_raises, 2, group_timeout_s=60.0, timeout_s=60)
    assert [r for r, _, _ in run_ranks(_whoami, 2, group_timeout_s=60.0)] == [0, 1]
