"""The one multi-rank test harness.

``run_ranks(fn, world_size, *args)`` runs ``fn(*args)`` on every rank of a gloo group and returns the
per-rank results in rank order. Ranks are spawned processes that meet through a file:// rendezvous;
every collective runs under the group timeout, so a rank that never joins makes its peers fail within
that timeout instead of hanging. On any failure all ranks are killed and ``DistFailure`` is raised with
the failing rank's traceback.

Spawning a rank costs an interpreter start and a torch import (seconds), so ranks are kept in a pool
per (world_size, group_timeout) and reused by later calls; a failure discards that pool. `fn` must be
importable by reference (a module-level function); what it returns must be picklable.

``run_cases(fn, world_size, cases)`` runs ``fn(*case)`` for many cases in ONE call on the ranks and returns
each case's per-rank outcome, so that a module-scoped fixture can pay one round trip per world size while
parametrized tests assert one case each (each case has its own test id; `case_result` re-raises what that
case raised on a rank). A case that fails on some ranks only, before its last collective, desynchronizes
the group: the following cases then fail on the group timeout, and the first failing case is still named.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any

_CTX = mp.get_context("spawn")

#: The tiny Llama several tests build: keyword arguments of tpext.models.LlamaConfig and of
#: transformers.LlamaConfig alike (override a field with ``dict(SMALL_LLAMA, num_key_value_heads=2)``).
SMALL_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    vocab_size=100,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
)
_POLL_S = 0.05


class DistFailure(AssertionError):
    """A rank raised, died, or did not finish in time. The message holds the failing rank's traceback."""


def _rank_main(
    rank: int,
    world_size: int,
    init_file: str,
    group_timeout_s: float,
    backend: str,
    tasks: mp.Queue,
    results: mp.Queue,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the machine's cores; one BLAS thread each
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=group_timeout_s),
        )
        results.put((rank, "ready", None))
    except BaseException:  # noqa: BLE001 - relayed to the parent verbatim
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            value = fn(*args)
            # The queue pickles in a feeder thread that swallows errors: an unpicklable result (a tensor
            # that requires grad) would never arrive and the parent would wait out its timeout. Pickle here.
            ForkingPickler.dumps(value)
            results.put((rank, "ok", value))
        except BaseException:  # noqa: BLE001 - relayed to the parent verbatim
            results.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class _RankPool:
    def __init__(self, world_size: int, group_timeout_s: float, backend: str, start_timeout_s: float = 120.0):
        self.world_size = world_size
        self._tmp = tempfile.mkdtemp(prefix="tpext-dist-")
        self._results: mp.Queue = _CTX.Queue()
        self._tasks = [_CTX.Queue() for _ in range(world_size)]
        self._procs = [
            _CTX.Process(
                target=_rank_main,
                daemon=True,
                name=f"tpext-rank{r}",
                args=(
                    r,
                    world_size,
                    os.path.join(self._tmp, "rendezvous"),
                    group_timeout_s,
                    backend,
                    self._tasks[r],
                    self._results,
                ),
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", start_timeout_s, what="joining the group")

    def run(self, fn: Callable[..., Any], args: tuple, timeout_s: float) -> list[Any]:
        for q in self._tasks:
            q.put((fn, args))
        return self._collect("ok", timeout_s, what=f"running {getattr(fn, '__qualname__', fn)}")

    def _collect(self, expected: str, timeout_s: float, what: str) -> list[Any]:
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < self.world_size:
            try:
                rank, status, payload = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self._fail(
                        f"rank(s) died while {what}: "
                        + ", ".join(f"rank {r} exit code {code}" for r, code in dead)
                    )
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(out))
                    self._fail(f"rank(s) {missing} did not finish within {timeout_s:.0f}s while {what}")
                continue
            if status == "error":
                # A rank that died makes its peers fail with connection errors, often before its own
                # exit is visible: look once more, so the root cause is named first.
                time.sleep(0.5)
                dead = "".join(
                    f"rank {r} exit code {p.exitcode}; "
                    for r, p in enumerate(self._procs)
                    if not p.is_alive()
                )
                prefix = f"rank(s) died while {what}: {dead}then " if dead else ""
                self._fail(f"{prefix}rank {rank} of {self.world_size} failed while {what}:\n{payload}")
            assert status == expected, (status, expected)
            out[rank] = payload
        return [out[r] for r in range(self.world_size)]

    def _fail(self, message: str) -> None:
        self.close(graceful=False)
        raise DistFailure(message)

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:  # kill whatever is still there (stuck in a collective, or not graceful)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        shutil.rmtree(self._tmp, ignore_errors=True)


_pools: dict[tuple[int, float, str], _RankPool] = {}


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    group_timeout_s: float = 30.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(*args)`` on `world_size` ranks; return the results in rank order, or raise DistFailure."""
    key = (world_size, group_timeout_s, backend)
    pool = _pools.get(key)
    if pool is None:
        pool = _pools[key] = _RankPool(world_size, group_timeout_s, backend)
    try:
        return pool.run(fn, args, timeout_s)
    except DistFailure:
        _pools.pop(key, None)  # that pool's ranks are gone
        raise


def shutdown() -> None:
    """Stop every pooled rank (called at the end of the test session)."""
    while _pools:
        _pools.popitem()[1].close()


atexit.register(shutdown)


def _run_cases(fn: Callable[..., Any], cases: list[tuple]) -> list[tuple[str, Any]]:
    out = []
    for case in cases:
        try:
            out.append(("ok", fn(*case)))
        except Exception:  # noqa: BLE001 - returned to the parent, re-raised by case_result
            out.append(("error", traceback.format_exc()))
    return out


def run_cases(
    fn: Callable[..., Any], world_size: int, cases: list[tuple], **kwargs: Any
) -> dict[tuple, list]:
    """Run ``fn(*case)`` for every case on `world_size` ranks in one call; return {case: [(status, value)
    per rank]}, status "ok" (value: what fn returned) or "error" (value: the rank's traceback)."""
    cases = [tuple(c) for c in cases]
    per_rank = run_ranks(_run_cases, world_size, fn, cases, **kwargs)
    return {case: [outcomes[i] for outcomes in per_rank] for i, case in enumerate(cases)}


def case_result(results: dict[tuple, list], case: tuple) -> list[Any]:
    """The per-rank values `run_cases` recorded for `case`; DistFailure naming the rank if one raised."""
    outcomes = results[tuple(case)]
    for rank, (status, value) in enumerate(outcomes):
        if status == "error":
            raise DistFailure(f"rank {rank} of {len(outcomes)} failed on case {case}:\n{value}")
    return [value for _, value in outcomes]


def cases_fixture(fn: Callable[..., Any], cases: list[tuple], world_sizes=(2, 4), **kwargs: Any):
    """A module-scoped pytest fixture, parametrized over `world_sizes` (ids "tp2", "tp4"), whose value is
    ``run_cases(fn, world_size, cases, **kwargs)``: one round trip per world size for all the cases.

    Args:
        fn: module-level function run as ``fn(*case)`` on every rank.
        cases: the cases, hashable, picklable tuples.
        world_sizes: the world sizes.
        **kwargs: passed on to `run_cases` (timeouts, backend).

    Returns:
        The fixture: assign it to a module-level name, which is the fixture's name.

    Example:
        >>> results = cases_fixture(_compare, CASES, timeout_s=600.0)
    """
    import pytest

    @pytest.fixture(scope="module", params=list(world_sizes), ids=lambda w: f"tp{w}")
    def fixture(request):
        return run_cases(fn, request.param, cases, **kwargs)

    return fixture


def sp_ids(cases: list[tuple]) -> list[str]:
    """Test ids of (name, sequence_parallel) cases: "llama-sp", "llama-nosp".

    Example:
        >>> @pytest.mark.parametrize("family, sp", CASES, ids=sp_ids(CASES))
    """
    return [f"{name}-{'sp' if sp else 'nosp'}" for name, sp in cases]


class CaseBatches:
    """Cases that differ by world size, run one `run_cases` call per world size, at the first test that
    needs that world size.

    Hold one in a module-scoped fixture and parametrize the tests over ``pairs()`` (world size, case): each
    case keeps its own test id, and the ranks are visited once per world size however many cases there are.

    Args:
        fn: module-level function run as ``fn(*case)`` on every rank.
        cases_by_world: {world_size: [case, ...]}; a case is a hashable, picklable tuple.
        **kwargs: passed on to `run_cases` (timeouts, backend).

    Example:
        >>> CASES = {1: [("a",), ("b",)], 2: [("a",)]}
        >>> batches = CaseBatches.fixture(_case, CASES)
        >>> @pytest.mark.parametrize(("world", "case"), CaseBatches.pairs(CASES), ids=CaseBatches.id)
        ... def test_case(batches, world, case):
        ...     per_rank = batches.result(world, case)
    """

    def __init__(self, fn: Callable[..., Any], cases_by_world: dict[int, list[tuple]], **kwargs: Any):
        self._fn, self._cases, self._kwargs = fn, cases_by_world, kwargs
        self._results: dict[int, dict[tuple, list] | DistFailure] = {}

    @staticmethod
    def pairs(cases_by_world: dict[int, list[tuple]]) -> list[tuple[int, tuple]]:
        """Every (world size, case) pair, world sizes in order."""
        return [(w, tuple(c)) for w in sorted(cases_by_world) for c in cases_by_world[w]]

    @staticmethod
    def id(value: int | tuple) -> str:
        """The test id of a `pairs` element: "tp2" for a world size, a case's fields joined by "-"."""
        return f"tp{value}" if isinstance(value, int) else "-".join(map(str, value))

    @classmethod
    def fixture(cls, fn: Callable[..., Any], cases_by_world: dict[int, list[tuple]], **kwargs: Any):
        """A module-scoped pytest fixture whose value is ``CaseBatches(fn, cases_by_world, **kwargs)``;
        assign it to a module-level name, which is the fixture's name."""
        import pytest

        @pytest.fixture(scope="module")
        def batches():
            return cls(fn, cases_by_world, **kwargs)

        return batches

    def result(self, world_size: int, case: tuple) -> list[Any]:
        """`case_result` of `case` at `world_size`, running all of that world size's cases on first use."""
        if world_size not in self._results:
            try:
                self._results[world_size] = run_cases(
                    self._fn, world_size, self._cases[world_size], **self._kwargs
                )
            except DistFailure as e:  # the ranks are gone: every case of this size fails with the cause
                self._results[world_size] = e
        results = self._results[world_size]
        if isinstance(results, DistFailure):
            raise results
        return case_result(results, case)
