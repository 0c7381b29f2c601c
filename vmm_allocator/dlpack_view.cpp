// The DLPack ABI (v0.x "dltensor" capsules), declared here from the public specification:
// https://dmlc.github.io/dlpack/latest/c_api.html
#include "dlpack_view.h"

#include <cstdint>

namespace glake {
namespace {

struct DLDevice {
  int32_t device_type;  // kDLCPU = 1, kDLCUDA = 2
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // kDLUInt = 1
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// Owns what the DLTensor points at; keeps the reservation (and so the address range) alive.
struct Export {
  DLManagedTensor managed;
  int64_t shape[1];
  int64_t strides[1];
  std::shared_ptr<Reservation> reservation;
};

void delete_export(DLManagedTensor* self) { delete static_cast<Export*>(self->manager_ctx); }

// A consumer renames the capsule to "used_dltensor" and takes over the deleter; an unconsumed
// capsule frees the export itself.
void destroy_capsule(PyObject* capsule) {
  if (!PyCapsule_IsValid(capsule, "dltensor")) return;
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  if (managed && managed->deleter) managed->deleter(managed);
}

}  // namespace

pybind11::capsule make_dlpack_capsule(std::shared_ptr<Reservation> reservation, int device_type, int device_id) {
  auto* ex = new Export();
  ex->reservation = std::move(reservation);
  ex->shape[0] = static_cast<int64_t>(ex->reservation->bytes);
  ex->strides[0] = 1;
  DLTensor& t = ex->managed.dl_tensor;
  t.data = reinterpret_cast<void*>(ex->reservation->va);
  t.device = DLDevice{device_type, device_id};
  t.ndim = 1;
  t.dtype = DLDataType{1, 8, 1};
  t.shape = ex->shape;
  t.strides = ex->strides;
  t.byte_offset = 0;
  ex->managed.manager_ctx = ex;
  ex->managed.deleter = delete_export;
  return pybind11::capsule(&ex->managed, "dltensor", &destroy_capsule);
}

}  // namespace glake
