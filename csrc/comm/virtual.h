// Virtual ranks: R ranks of one group inside one process, one host thread per rank, all on one device
// (or the CPU). Each rank runs the real op and schedule code with a Communicator whose collectives meet
// in a shared hub; the last rank to arrive executes the collective for everyone (ATen copies and sums
// in rank order, so every rank gets identical bits). On CUDA the hub works on tpext's communication
// stream: it waits on an event recorded on each rank's current stream and records a completion event
// that Pending::wait() makes the waiting stream wait on, exactly as the NCCL communicator does. This is
// how multi-rank schedules, their lanes and their events are tested on a single GPU, where NCCL refuses
// two ranks (DESIGN.md section 4). Test machinery: not a fast path.
//
// Names: a virtual group of size R is addressed as "tpext-virtual/<id>/<rank>", one name per rank,
// made by make_virtual_group(). Ranks that fail abort the hub, so their peers raise instead of waiting.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"

namespace tpext::comm {

// Registers a hub of `world_size` ranks; returns the group name of each rank.
std::vector<std::string> make_virtual_group(int64_t world_size);

// Forgets the hub behind these names (after its ranks finished).
void release_virtual_group(const std::string& any_rank_name);

// Aborts the hub of `name`: ranks waiting in a collective (and later ones) raise with `why`.
void abort_virtual_group(const std::string& name, const std::string& why);

// nullptr / -1 when `name` is not a virtual group name.
std::unique_ptr<Communicator> make_virtual_communicator(const std::string& name);
int64_t virtual_group_size(const std::string& name);

}  // namespace tpext::comm
