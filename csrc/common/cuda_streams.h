// The CUDA streams tpext owns besides the caller's: one high-priority communication stream and one
// extra compute stream per device. CUDA builds only (TPEXT_WITH_CUDA); host code, torch's c10 only.
//
// Why own streams instead of c10's pool: pool streams are handed out round-robin to every caller in
// the process, so "the" communication stream could be shared with unrelated work and lose its
// priority; these are created once per device and used by tpext alone. They live as long as the
// process (never destroyed: destroying a stream at static-destruction time races the CUDA runtime's
// own teardown). Create them before a CUDA graph capture (any eager tpext call does): stream creation
// is not a capturable operation.
#pragma once

#ifdef TPEXT_WITH_CUDA

#include <c10/core/Device.h>
#include <c10/cuda/CUDAStream.h>

namespace tpext::cuda {

// Highest priority the device offers, non-blocking w.r.t. the legacy default stream. NCCL kernels
// launched here are scheduled ahead of queued GEMM blocks, so communication is not starved.
c10::cuda::CUDAStream comm_stream(c10::DeviceIndex device);

// Default priority, non-blocking: the second lane of the two-stream chunked pipeline.
c10::cuda::CUDAStream side_compute_stream(c10::DeviceIndex device);

}  // namespace tpext::cuda

#endif  // TPEXT_WITH_CUDA
