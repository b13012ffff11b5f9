// tpext's own NCCL communicator: one ncclComm_t per torch.distributed group, created on first use from
// a ncclUniqueId broadcast over that group, configured (SM budget) from Python, cached by group name,
// destroyed with the registry. CUDA builds only (TPEXT_WITH_CUDA).
//
// Why not c10d's NCCL ProcessGroup: its communicator's CTA budget cannot be set per group, and its
// internal stream is one we cannot give a priority. Here collectives run on tpext's high-priority
// communication stream (common/cuda_streams.h); each one waits for an event recorded on the caller's
// current stream and records its own completion event, which Pending::wait() makes the then-current
// stream wait for. No host synchronisation after creation, so a warmed-up schedule is CUDA-graph
// capturable (creation itself is not: it broadcasts the id and copies it to the host).
//
// Invariant: every rank of a group sets the same options and uses the group from the same device.
// Creation is a collective (ncclCommInitRankConfig): all ranks reach it on their first tpext op over
// the group, or on the first op after set_nccl_options dropped the old communicator.
#pragma once

#ifdef TPEXT_WITH_CUDA

#include <cstdint>
#include <memory>
#include <string>

#include <c10/core/Device.h>
#include <c10/util/intrusive_ptr.h>

#include "comm/communicator.h"

namespace c10d {
class ProcessGroup;
}

namespace tpext::comm {

struct NcclOptions {
  int64_t max_ctas = 0;          // ncclConfig_t.maxCTAs: most SMs one NCCL kernel occupies; 0 = NCCL's default
  int64_t cga_cluster_size = 0;  // ncclConfig_t.cgaClusterSize (Hopper: 0-8); 0 = NCCL's default
  bool local_fast_path = true;   // a group of one makes no NCCL call; false forces the real path (tests)
};

// Records the options of `group_name` and drops (destroys) its cached communicator when they change,
// so the next op creates one with them. Throws on out-of-range values.
void set_nccl_options(const std::string& group_name, const NcclOptions& options);
NcclOptions nccl_options(const std::string& group_name);

// The cached communicator of the group, created on first use (collective) on `device`.
std::unique_ptr<Communicator> make_nccl_communicator(const std::string& group_name,
                                                     const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                                     c10::DeviceIndex device);

struct NcclCommInfo {
  bool created = false;
  int rank = -1, size = 0, device = -1;
  NcclOptions options;  // the options the live communicator was created with
};
NcclCommInfo nccl_comm_info(const std::string& group_name);

// NCCL's runtime version code (ncclGetVersion), e.g. 22809 for 2.28.9.
int nccl_runtime_version();

// Finalizes and destroys every cached communicator (registered with atexit by tpext/ops/nccl.py, because
// destroying them during static destruction would race the CUDA runtime's teardown). One whose
// ncclCommGetAsyncError reports an error, before or after the finalize, is aborted instead. Finalize
// waits for the peers: when one failed, use abort_nccl_communicators.
void destroy_nccl_communicators();

// Aborts every cached communicator (ncclCommAbort: never waits for peers, drops queued collectives).
// For a process whose peer failed, or that gives up on the group; the next op creates a new one.
void abort_nccl_communicators();

}  // namespace tpext::comm

#endif  // TPEXT_WITH_CUDA
