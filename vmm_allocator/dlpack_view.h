// Zero-copy export of a reserved range as a DLPack capsule (a 1-D uint8 tensor), which
// torch.from_dlpack turns into a tensor on the CPU or on the GPU without copying a byte.
#pragma once
#include <pybind11/pybind11.h>

#include <memory>

#include "allocator.h"

namespace glake {

pybind11::capsule make_dlpack_capsule(std::shared_ptr<Reservation> reservation, int device_type, int device_id);

}  // namespace glake
