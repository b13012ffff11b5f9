"""Policy: how the overlapped ops are arranged. Pure functions of shapes; C++ only executes the choice.

The cost model behind `tpext plan` lives beside it (cost_model, presets, calibration, estimate, report;
docs/planner.md) and is imported only by that command.
"""

from __future__ import annotations

__all__ = ["auto_chunks", "resolve_chunks"]

# Below this many rows a chunk's GEMM is too thin to be efficient and the per-collective latency is not
# hidden by anything. Provisional: the CPU benchmark (bench/ops_cpu.py) found 2-4 chunks best at 2048 rows;
# the GPU heuristic will be calibrated by the CUDA benchmarks.
MIN_ROWS_PER_CHUNK = 256
MAX_AUTO_CHUNKS = 4


def auto_chunks(rows: int, world_size: int) -> int:
    """Chunk count for `rows` rows of GEMM output on a group of `world_size` ranks."""
    if world_size <= 1:
        return 1
    return max(1, min(MAX_AUTO_CHUNKS, rows // MIN_ROWS_PER_CHUNK))


def resolve_chunks(chunks: int | str, rows: int, world_size: int) -> int:
    """`chunks` as given by a user ("auto" or an int >= 1) -> the int the op receives."""
    if chunks == "auto":
        return auto_chunks(rows, world_size)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"tpext: chunks must be 'auto' or an int >= 1, got {chunks!r}")
    return chunks
