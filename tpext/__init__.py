"""tpext: tensor parallelism for PyTorch with the GEMM and its collective overlapped in C++/CUDA."""

import torch  # noqa: F401  (loads libtorch, which _C links against)

from tpext import (  # noqa: E402  (after ops: the modules use them)
    _C,  # noqa: F401  (loads the extension: registers torch.ops.tpext.*)
    models,
    nn,
    ops,
    p2p,  # noqa: E402  (after ops)
    parallel,
    random,
)
from tpext.checkpoint import from_pretrained, gather_state_dict, load_checkpoint, save_checkpoint
from tpext.distributed import group_name, resolve_group
from tpext.parallel import Style, auto_plan, parallelize
from tpext.sharding import Piece
from tpext.stats import comm_stats

__version__ = "0.1.0"

#: True when the CUDA kernels were compiled into this build.
cuda_compiled: bool = _C.cuda_compiled

__all__ = [
    "ops",
    "nn",
    "p2p",
    "random",
    "models",
    "parallel",
    "comm_stats",
    "group_name",
    "resolve_group",
    "parallelize",
    "auto_plan",
    "Style",
    "Piece",
    "load_checkpoint",
    "save_checkpoint",
    "gather_state_dict",
    "from_pretrained",
    "cuda_compiled",
    "__version__",
]
