"""Checkpoints of tensor-parallel models.

* `tpext.checkpoint.dense`: the dense safetensors format Hugging Face writes, read shard by shard into a
  parallelized model (`load_checkpoint`), or gathered and written by rank 0 (`save_checkpoint`).
* `tpext.checkpoint.pretrained`: `from_pretrained(cls, path)`, a pretrained model built on the meta device,
  parallelized, and filled with only this rank's slices.
* `tpext.checkpoint.dcp`: torch.distributed.checkpoint on a parallelized model and its optimizer, unchanged:
  their state dicts hand out sharded tensors as `ShardedState` (dense shape, this rank's slices), so DCP
  writes each slice once and reshards on load. Nothing to call: the hooks come with the layouts.
"""

from tpext.checkpoint.dcp import ShardedState, local_state
from tpext.checkpoint.dense import (
    CheckpointError,
    checkpoint_files,
    gather_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from tpext.checkpoint.pretrained import from_pretrained

__all__ = [
    "CheckpointError",
    "checkpoint_files",
    "from_pretrained",
    "gather_state_dict",
    "load_checkpoint",
    "save_checkpoint",
    "ShardedState",
    "local_state",
]
