"""The runtime schedule policy: how the overlapped GEMM ops are chunked and streamed.

A *schedule* is (chunks, algorithm): the GEMM is split into `chunks` row chunks and the collective of
one chunk overlaps the GEMM of the next, in the arrangement `algorithm` names. ``Algorithm`` mirrors
``tpext::schedule::Algorithm`` in csrc/schedule/schedule.h (its ints are part of the op schemas). These
are pure functions of shapes, group size and device: Python decides, C++ executes the choice.

``chunks="auto"`` asks the heuristic below for both; an explicit chunk count with ``algorithm="auto"``
gets the sequential schedule for 1 chunk and the device's pipelined one otherwise; explicit values of
both pass through unchanged (the ops validate them).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = [
    "Algorithm",
    "AlgorithmLike",
    "Chunks",
    "Schedule",
    "auto_chunks",
    "auto_schedule",
    "default_algorithm",
    "resolve_chunks",
    "resolve_schedule",
]


class Algorithm(enum.IntEnum):
    """How the chunk loop of a GEMM op is arranged (the ops' ``algorithm`` argument).

    Example:
        >>> tpext.ops.gemm_all_reduce(x, w, chunks=4, algorithm=tpext.ops.Algorithm.CHUNKED_PIPELINE)
    """

    SEQUENTIAL = 0  # one GEMM, one collective; chunks must be 1
    CHUNKED_PIPELINE = 1  # row chunks; collective of chunk i overlaps the GEMM of chunk i+1
    CHUNKED_TWO_STREAMS = 2  # as CHUNKED_PIPELINE, chunk GEMMs over two CUDA streams (CPU: same as 1)


class Schedule(NamedTuple):
    """A resolved schedule, as the ops receive it.

    Args:
        chunks: the chunk count (>= 1).
        algorithm: an `Algorithm`, or a raw int passed through for the op to validate.

    Example:
        >>> tpext.ops.auto_schedule(4096, world_size=2)
        Schedule(chunks=4, algorithm=<Algorithm.CHUNKED_PIPELINE: 1>)
    """

    chunks: int
    algorithm: int  # an Algorithm, or a raw int passed through for the op to validate


#: What users may pass as ``chunks``: an int >= 1 or "auto".
Chunks = int | str
#: What users may pass as ``algorithm``: an Algorithm, its int, or "auto".
AlgorithmLike = Algorithm | int | str

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
    """Chunk count of the ``chunks="auto"`` heuristic.

    Args:
        rows: rows of the GEMM output (the leading dims of x flattened; for all-gather, after the gather).
        world_size: ranks in the group.
        device_type: ``"cpu"`` or ``"cuda"``.
        row_bytes: bytes of one row of what the collective moves; 0 when unknown (the row rule alone).

    Returns:
        An int in [1, MAX_AUTO_CHUNKS]: 1 for a group of one or when the rows (and, on CPU, the bytes) are
        too few to split.

    Example:
        >>> auto_chunks(4096, world_size=2, row_bytes=4096)
        4
    """
    if world_size <= 1:
        return 1
    min_rows = MIN_ROWS_PER_CHUNK_CUDA if device_type == "cuda" else MIN_ROWS_PER_CHUNK
    chunks = min(MAX_AUTO_CHUNKS, rows // min_rows)
    if device_type != "cuda" and row_bytes > 0:
        chunks = min(chunks, rows * row_bytes // MIN_BYTES_PER_CHUNK_CPU)
    return max(1, chunks)


def default_algorithm(chunks: int, device_type: str = "cpu") -> Algorithm:
    """The algorithm for an explicit chunk count.

    Args:
        chunks: the chunk count (>= 1).
        device_type: ``"cpu"`` or ``"cuda"``.

    Returns:
        ``SEQUENTIAL`` for one chunk, else ``CHUNKED_TWO_STREAMS`` on CUDA and ``CHUNKED_PIPELINE`` on CPU.

    Example:
        >>> tpext.ops.default_algorithm(4, "cuda")
        <Algorithm.CHUNKED_TWO_STREAMS: 2>
    """
    if chunks == 1:
        return Algorithm.SEQUENTIAL
    return Algorithm.CHUNKED_TWO_STREAMS if device_type == "cuda" else Algorithm.CHUNKED_PIPELINE


def auto_schedule(rows: int, world_size: int, device_type: str = "cpu", row_bytes: int = 0) -> Schedule:
    """The schedule behind ``chunks="auto"``: the chunk count of `auto_chunks`, the algorithm of
    `default_algorithm`.

    Args:
        rows, world_size, device_type, row_bytes: as for `auto_chunks`.

    Returns:
        A `Schedule`.

    Example:
        >>> auto_schedule(4096, world_size=2, device_type="cuda")
        Schedule(chunks=4, algorithm=<Algorithm.CHUNKED_TWO_STREAMS: 2>)
    """
    chunks = auto_chunks(rows, world_size, device_type, row_bytes)
    return Schedule(chunks, default_algorithm(chunks, device_type))


def resolve_chunks(chunks: Chunks, rows: int, world_size: int, device_type: str = "cpu") -> int:
    """`chunks` as a user gave it -> the int the op receives.

    Args:
        chunks: "auto" or an int >= 1.
        rows, world_size, device_type: as for `auto_chunks` (used for "auto").

    Returns:
        The chunk count.

    Raises:
        ValueError: `chunks` is neither "auto" nor an int >= 1.

    Example:
        >>> tpext.ops.resolve_chunks(3, rows=4096, world_size=2)
        3
    """
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


def resolve_schedule(
    chunks: Chunks,
    algorithm: AlgorithmLike,
    rows: int,
    world_size: int,
    device_type: str = "cpu",
    row_bytes: int = 0,
) -> Schedule:
    """Fill in whatever is "auto"; explicit ints pass through (the op checks their ranges).

    Args:
        chunks: "auto" or an int.
        algorithm: "auto", an `Algorithm` or its int.
        rows, world_size, device_type, row_bytes: as for `auto_chunks`.

    Returns:
        The `Schedule` the op receives.

    Raises:
        ValueError: a string other than "auto", a bool, or another type was given.

    Example:
        >>> resolve_schedule(2, "auto", rows=64, world_size=2)
        Schedule(chunks=2, algorithm=<Algorithm.CHUNKED_PIPELINE: 1>)
    """
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
