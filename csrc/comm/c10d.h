// The c10d backend (c10d.cpp): a Communicator over any torch.distributed ProcessGroup (gloo on CPU,
// NCCL on CUDA), the local identity for groups of one, and the group queries the ops make before any
// collective. Groups are named by their registered name (ProcessGroup.group_name); `op` names the
// calling op in the errors raised.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "comm/communicator.h"

namespace tpext::comm {

// The registered process group of that name; raises, naming `op`, when there is none.
c10::intrusive_ptr<c10d::ProcessGroup> resolve_group(const std::string& group_name, const char* op);

// The identity of a group of one: no collective is ever made (Communicator::local() is true).
std::unique_ptr<Communicator> make_local_communicator();

// The group's own c10d ProcessGroup (gloo, NCCL), or the local identity for a group of one: what the
// P2P ops fall back to and compute their CPU reference over (ops/p2p.cpp).
std::unique_ptr<Communicator> make_c10d_communicator(const std::string& group_name, const char* op);

// Size of the named group, virtual groups included (checks that depend on it run before any
// communicator is made).
int64_t group_size(const std::string& group_name, const char* op);

// Under TORCH_DISTRIBUTED_DEBUG=DETAIL (torch's collective-checking level), checks before an op's first
// collective that every rank of the group calls it with the same `fields` (sizes, dtype, schedule; named
// for the error), by one all-gather over the group's c10d ProcessGroup, and raises the same error on
// every rank if not, where a mismatch would otherwise hang or abort inside the collective. Does nothing
// at other levels, for groups of one and for virtual groups.
void check_ranks_agree(const std::string& group_name, const char* op, const c10::Device& device,
                       const std::vector<std::pair<const char*, int64_t>>& fields);

}  // namespace tpext::comm
