"""Policy: how the overlapped ops are arranged. Pure functions of shapes; C++ only executes the choice.

A schedule is (chunks, algorithm). ``Algorithm`` mirrors ``tpext::schedule::Algorithm`` (the ints are part
of the op schemas). ``chunks="auto"`` asks the heuristic below for both; an explicit chunk count with
``algorithm="auto"`` gets the sequential schedule for 1 chunk and the device's pipelined one otherwise;
explicit values of both are passed through unchanged (the ops validate them).

The cost model behind `tpext plan` lives beside it (cost_model, presets, calibration, estimate, report;
docs/planner.md) and is imported only by that command.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Union

__all__ = ["Algorithm", "Schedule", "auto_chunks", "auto_schedule", "default_algorithm", "resolve_chunks", "resolve_schedule"]


class Algorithm(enum.IntEnum):
    SEQUENTIAL = 0           # one GEMM, one collective; chunks must be 1
    CHUNKED_PIPELINE = 1     # row chunks; collective of chunk i overlaps the GEMM of chunk i+1
    CHUNKED_TWO_STREAMS = 2  # as CHUNKED_PIPELINE, chunk GEMMs alternating over two CUDA streams (CPU: same as 1)


class Schedule(NamedTuple):
    chunks: int
    algorithm: int  # an Algorithm, or a raw int passed through for the op to validate


Chunks = Union[int, str]
AlgorithmLike = Union[Algorithm, int, str]

# Below this many rows a chunk's GEMM is too thin to be efficient and the per-collective latency is not
# hidden by anything. CPU: the gloo benchmark (bench/ops_cpu.py) found 2-4 chunks best at 2048 rows.
# CUDA: provisional, not yet calibrated on a GPU (bench/gemm_decomposition.py measures the tax that sets
# it): a 1024-row chunk of an N = 8192 bf16 GEMM is ~2 waves of 128x256 tiles on 132 SMs, so the partial
# last wave the second stream fills is at most a third of the chunk.
MIN_ROWS_PER_CHUNK = 256
MIN_ROWS_PER_CHUNK_CUDA = 1024
MAX_AUTO_CHUNKS = 4
# Every chunk pays the collective's fixed cost once, so a chunk must carry enough bytes for that cost to
# be small beside its transfer. gloo on the 2-core CI machine: 263 us per collective at 1.5 GB/s bus
# bandwidth (bench/results/cpu-amd-epyc-2cores/calibration.json), i.e. the time of ~400 KB. Measured
# there: 4 chunks of 128-512 KB lost 3-44% to one chunk (tpext bench, 1024x128 and 2048x256), 4 chunks
# of 2 MB won 17% (bench/ops_cpu.py). CPU only: the CUDA figure waits for a GPU calibration.
MIN_BYTES_PER_CHUNK_CPU = 1 << 20


def auto_chunks(rows: int, world_size: int, device_type: str = "cpu", row_bytes: int = 0) -> int:
    """Chunk count for `rows` rows of GEMM output on a group of `world_size` ranks; row_bytes, when known,
    is the size of one row of what the collective moves (0: unknown, the row rule alone)."""
    if world_size <= 1:
        return 1
    min_rows = MIN_ROWS_PER_CHUNK_CUDA if device_type == "cuda" else MIN_ROWS_PER_CHUNK
    chunks = min(MAX_AUTO_CHUNKS, rows // min_rows)
    if device_type != "cuda" and row_bytes > 0:
        chunks = min(chunks, rows * row_bytes // MIN_BYTES_PER_CHUNK_CPU)
    return max(1, chunks)


def default_algorithm(chunks: int, device_type: str = "cpu") -> Algorithm:
    """The algorithm for an explicit chunk count: sequential for one chunk, else the device's pipeline."""
    if chunks == 1:
        return Algorithm.SEQUENTIAL
    return Algorithm.CHUNKED_TWO_STREAMS if device_type == "cuda" else Algorithm.CHUNKED_PIPELINE


def auto_schedule(rows: int, world_size: int, device_type: str = "cpu", row_bytes: int = 0) -> Schedule:
    """The heuristic behind ``chunks="auto"``: chunk count from the rows (and bytes), algorithm from the
    device."""
    chunks = auto_chunks(rows, world_size, device_type, row_bytes)
    return Schedule(chunks, default_algorithm(chunks, device_type))


def resolve_chunks(chunks: Chunks, rows: int, world_size: int, device_type: str = "cpu") -> int:
    """`chunks` as given by a user ("auto" or an int >= 1) -> the int the op receives."""
    if chunks == "auto":
        return auto_chunks(rows, world_size, device_type)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"tpext: chunks must be 'auto' or an int >= 1, got {chunks!r}")
    return chunks


def _check_auto(value, what: str) -> None:
    if isinstance(value, str) and value != "auto":
        raise ValueError(f"tpext: {what} must be 'auto' or an int, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"tpext: {what} must be 'auto' or an int, got {value!r}")


def resolve_schedule(chunks: Chunks, algorithm: AlgorithmLike, rows: int, world_size: int,
                     device_type: str = "cpu", row_bytes: int = 0) -> Schedule:
    """Fill in whatever is "auto"; explicit ints pass through (the op checks their ranges). row_bytes:
    bytes of one row of the collective's payload (see auto_chunks)."""
    _check_auto(chunks, "chunks")
    _check_auto(algorithm, "algorithm")
    if chunks == "auto":
        if algorithm == "auto":
            return auto_schedule(rows, world_size, device_type, row_bytes)
        if int(algorithm) == Algorithm.SEQUENTIAL:
            return Schedule(1, Algorithm.SEQUENTIAL)
        return Schedule(auto_chunks(rows, world_size, device_type, row_bytes), int(algorithm))
    if algorithm == "auto":
        return Schedule(chunks, default_algorithm(chunks, device_type))
    return Schedule(chunks, int(algorithm))
