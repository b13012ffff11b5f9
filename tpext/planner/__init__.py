"""The cost model behind `tpext plan` (cost_model, presets, calibration, estimate, report; docs/planner.md),
imported only by that command.

The runtime schedule policy the ops and layers use (how many chunks, which algorithm) lives beside the
ops, in tpext/ops/schedule.py. Its names are re-exported here, where users found them first:
``tpext.planner.Algorithm``, ``tpext.planner.auto_schedule`` and the rest keep working.
"""

from tpext.ops import schedule as _schedule
from tpext.ops.schedule import *  # noqa: F403  (re-exports, the policy's old home: its __all__)
from tpext.ops.schedule import (  # noqa: F401  (and its constants)
    MAX_AUTO_CHUNKS,
    MIN_BYTES_PER_CHUNK_CPU,
    MIN_ROWS_PER_CHUNK,
    MIN_ROWS_PER_CHUNK_CUDA,
)

__all__ = list(_schedule.__all__)
