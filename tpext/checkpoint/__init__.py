"""Checkpoints of tensor-parallel models.

* `tpext.checkpoint.dense`: the dense safetensors format Hugging Face writes, read shard by shard into a
  parallelized model (`load_checkpoint`), or gathered and written by rank 0 (`save_checkpoint`).
* `tpext.checkpoint.pretrained`: `from_pretrained(cls, path)`, a pretrained model built on the meta device,
  parallelized, and filled with only this rank's slices.
"""

from tpext.checkpoint.dense import (
                                    CheckpointError,
                                    checkpoint_files,
                                    gather_state_dict,
                                    load_checkpoint,
                                    save_checkpoint,
)
from tpext.checkpoint.pretrained import from_pretrained

__all__ = ["CheckpointError", "checkpoint_files", "from_pretrained", "gather_state_dict", "load_checkpoint", "save_checkpoint"]
