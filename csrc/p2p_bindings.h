// tpext._C.p2p_*: the Python entry points of the P2P symmetric-buffer registry (comm/p2p.h), which
// tpext/p2p.py drives. Called by the PYBIND11_MODULE in csrc/torch_bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

namespace tpext {

void bind_p2p(pybind11::module_& m);

}  // namespace tpext
