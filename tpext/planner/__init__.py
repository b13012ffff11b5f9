"""The cost model behind `tpext plan` (cost_model, presets, calibration, estimate, report; docs/planner.md),
imported only by that command.

The runtime schedule policy the ops and layers use (how many chunks, which algorithm) lives beside the
ops, in tpext/ops/schedule.py. Its names are re-exported here, where users found them first:
``tpext.planner.Algorithm``, ``tpext.planner.auto_schedule`` and the rest keep working.
"""

from tpext.ops.schedule import (  # noqa: F401  (re-exports: the policy's old home)
    MAX_AUTO_CHUNKS,
    MIN_BYTES_PER_CHUNK_CPU,
    MIN_ROWS_PER_CHUNK,
    MIN_ROWS_PER_CHUNK_CUDA,
    Algorithm,
    AlgorithmLike,
    Chunks,
    Schedule,
    auto_chunks,
    auto_schedule,
    default_algorithm,
    resolve_chunks,
    resolve_schedule,
)

__all__ = [
    "Algorithm",
    "Schedule",
    "auto_chunks",
    "auto_schedule",
    "default_algorithm",
    "resolve_chunks",
    "resolve_schedule",
]
