// make_communicator: which backend serves an op's group (see communicator.h).
#include "comm/communicator.h"

#include "comm/c10d.h"
#include "comm/nccl.h"
#include "comm/virtual.h"

namespace tpext::comm {

std::unique_ptr<Communicator> make_communicator(const std::string& group_name, const char* op,
                                                const c10::Device& device) {
  if (auto virtual_comm = make_virtual_communicator(group_name)) return virtual_comm;
#ifdef TPEXT_WITH_CUDA
  if (device.is_cuda()) {
    auto pg = resolve_group(group_name, op);
    if (pg->getSize() == 1 && nccl_options(group_name).local_fast_path) return make_local_communicator();
    return make_nccl_communicator(group_name, pg, device.index());
  }
#else
  (void)device;
#endif
  return make_c10d_communicator(group_name, op);
}

}  // namespace tpext::comm
