// The one interface both backends implement: address-space reservation, physical pages, mapping.
// Mechanism only -- no bookkeeping of who owns what (that is allocator.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace glake {

struct MemoryInfo {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // DLPack device type (1 = CPU, 2 = CUDA) and ordinal of the memory this backend maps.
  virtual int dlpack_device_type() const = 0;
  virtual int device_id() const = 0;
  // Smallest page size the backend can map (the driver's granularity; the OS page on host).
  virtual size_t granularity() const = 0;
  // Makes the device context current on the calling thread (no-op on host).
  virtual void bind_thread() {}
  virtual MemoryInfo memory_info() = 0;

  // Physical pages: created one at a time and named by a dense id chosen by the caller.
  virtual void set_page_size(size_t page_size) = 0;
  // Throws when creating `bytes` more of physical pages cannot succeed cleanly (host: more than the
  // machine has available, where the kernel's OOM killer would end the process instead of an error).
  virtual void check_capacity(size_t bytes) {}
  virtual void create_page(int64_t page_id) = 0;
  virtual void release_page(int64_t page_id) = 0;
  // After every page was released: drop what holds the pool (host: the memfd).
  virtual void close_pool() {}

  // Virtual address space.
  virtual uintptr_t reserve(size_t bytes) = 0;
  virtual void free_reservation(uintptr_t va, size_t bytes) noexcept = 0;

  // Map one physical page at va (not yet accessible), grant access to a mapped range, unmap one.
  virtual void map_page(uintptr_t va, int64_t page_id) = 0;
  virtual void set_access(uintptr_t va, size_t bytes) = 0;
  virtual void unmap_page(uintptr_t va) = 0;

  // Blocks until a recorded device event has completed (cuda: a CUevent handle; the worker calls it
  // before an unmap that queued kernels may still read through). No events exist on host.
  virtual void wait_event(uintptr_t event) {}
};

// Backends by name: "host" always works; "cuda" throws BackendUnavailableError when libcuda or a
// GPU is missing. "auto" is resolved by the caller (allocator.cpp).
std::shared_ptr<Backend> make_host_backend();
std::shared_ptr<Backend> make_cuda_backend(int device);
bool cuda_backend_available();

// "ENOMEM (Cannot allocate memory)" for an errno value.
std::string errno_text(int err);

}  // namespace glake
