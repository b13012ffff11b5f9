"""tpext: tensor parallelism for PyTorch with the GEMM and its collective overlapped in C++/CUDA."""

from tpext import _C  # noqa: F401  (loads the extension: registers torch.ops.tpext.*)
from tpext import ops
from tpext.distributed import group_name, resolve_group

__version__ = "0.1.0"

#: True when the CUDA kernels were compiled into this build.
cuda_compiled: bool = _C.cuda_compiled

__all__ = ["ops", "group_name", "resolve_group", "cuda_compiled", "__version__"]
