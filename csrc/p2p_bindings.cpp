// tpext._C.p2p_*: one binding per registry entry point of comm/p2p.h, under the name tpext/p2p.py uses.
#include "p2p_bindings.h"

#include <string>
#include <vector>

#include <torch/extension.h>

#include "comm/p2p.h"

namespace tpext {

void bind_p2p(pybind11::module_& m) {
  namespace py = pybind11;
  using namespace tpext::comm;
  m.def("p2p_create", [](const std::string& name, int rank, int world, int64_t capacity, int device) {
    return py::bytes(create_symmetric_buffers(name, rank, world, capacity, device));
  }, "Allocate this rank's symmetric buffer for group `name`; returns its CUDA IPC handle (bytes).");
  m.def("p2p_max_blocks", &max_coresident_blocks,
        "The largest device-synchronised P2P grid whose blocks are all resident at once on `device`.");
  m.def("p2p_open", &open_symmetric_buffers,
        "Map every peer's buffer and register the group's symmetric buffers (grid cap and wait budget agreed).");
  m.def("p2p_check", &check_symmetric_buffers,
        "Raise if the group's P2P kernels were aborted (timeout, or a rank's refusal); no synchronisation.");
  m.def("p2p_drain", &drain_symmetric_buffers,
        "Destroy dropped symmetric buffers (synchronises the device); not while the current stream captures.");
  m.def("p2p_copy_to_local", &copy_to_local,
        "Copy a tensor's bytes into this rank's symmetric buffer (stream-ordered).");
  m.def("p2p_copy_from_peer", &copy_from_peer,
        "Copy the first dst.nbytes() bytes of a peer's symmetric buffer into dst (stream-ordered).");
  m.def("p2p_release", &release_symmetric_buffers,
        "Drop the group's symmetric buffers (or its unavailability record) and destroy dropped buffers.");
  m.def("p2p_mark_unavailable", &mark_unavailable,
        "Record why P2P cannot serve group `name` (the ops then fall back and say so once).");
  m.def("p2p_status", &symmetric_buffers_status, "'' when the group's symmetric buffers are ready, else why not.");
  m.def("p2p_reset_warnings", &reset_fallback_warnings, "Forget which fallback reasons were already logged (tests).");
}

}  // namespace tpext
