// CUDA backend over the driver's virtual memory management API. libcuda is opened with dlopen at
// run time, so this file builds and imports on a machine with no GPU, no driver and no CUDA headers.
// The few driver types we need are declared below with the driver's ABI; when cuda.h is present
// at build time (setup.py defines GLAKE_HAVE_CUDA_H) their layout is checked against it.
#include <dlfcn.h>

#include <mutex>
#include <vector>

#include "backend.h"
#include "errors.h"

namespace glake {
namespace {

using CUresult = int;
using CUdevice = int;
using CUcontext = void*;
using CUdeviceptr = unsigned long long;
using CUmemHandle = unsigned long long;

struct CuMemLocation {
  int type;  // CU_MEM_LOCATION_TYPE_DEVICE = 1
  int id;
};
struct CuMemAllocationProp {
  int type;                   // CU_MEM_ALLOCATION_TYPE_PINNED = 1
  int requested_handle_types; // CU_MEM_HANDLE_TYPE_NONE = 0
  CuMemLocation location;
  void* win32_handle_meta_data;
  struct {
    unsigned char compression_type;
    unsigned char gpu_direct_rdma_capable;
    unsigned short usage;
    unsigned char reserved[4];
  } alloc_flags;
};
struct CuMemAccessDesc {
  CuMemLocation location;
  int flags;  // CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
};
constexpr int kLocationDevice = 1;
constexpr int kAllocationPinned = 1;
constexpr int kAccessReadWrite = 3;
constexpr int kGranularityMinimum = 0;
constexpr CUresult kSuccess = 0;

}  // namespace
}  // namespace glake

#ifdef GLAKE_HAVE_CUDA_H
#include <cuda.h>
static_assert(sizeof(glake::CuMemAllocationProp) == sizeof(CUmemAllocationProp), "CUmemAllocationProp ABI");
static_assert(sizeof(glake::CuMemAccessDesc) == sizeof(CUmemAccessDesc), "CUmemAccessDesc ABI");
static_assert(sizeof(glake::CuMemLocation) == sizeof(CUmemLocation), "CUmemLocation ABI");
#endif

namespace glake {
namespace {

// Function pointers into libcuda, resolved once per process.
struct Driver {
  void* lib = nullptr;
  std::string load_error;
  CUresult (*init)(unsigned);
  CUresult (*device_get_count)(int*);
  CUresult (*device_get)(CUdevice*, int);
  CUresult (*primary_ctx_retain)(CUcontext*, CUdevice);
  CUresult (*primary_ctx_release)(CUdevice);
  CUresult (*ctx_get_current)(CUcontext*);
  CUresult (*ctx_set_current)(CUcontext);
  CUresult (*get_error_name)(CUresult, const char**);
  CUresult (*mem_get_info)(size_t*, size_t*);
  CUresult (*mem_get_granularity)(size_t*, const CuMemAllocationProp*, int);
  CUresult (*mem_address_reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*mem_address_free)(CUdeviceptr, size_t);
  CUresult (*mem_create)(CUmemHandle*, size_t, const CuMemAllocationProp*, unsigned long long);
  CUresult (*mem_release)(CUmemHandle);
  CUresult (*mem_map)(CUdeviceptr, size_t, size_t, CUmemHandle, unsigned long long);
  CUresult (*mem_unmap)(CUdeviceptr, size_t);
  CUresult (*mem_set_access)(CUdeviceptr, size_t, const CuMemAccessDesc*, size_t);
  CUresult (*event_synchronize)(void*);

  template <typename F>
  bool resolve(F& fn, const char* symbol) {
    fn = reinterpret_cast<F>(dlsym(lib, symbol));
    if (!fn) load_error = std::string("libcuda.so.1 has no symbol ") + symbol;
    return fn != nullptr;
  }

  Driver() {
    lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* why = dlerror();
      load_error = std::string("libcuda.so.1 could not be loaded (") + (why ? why : "unknown") + ")";
      return;
    }
    bool ok = resolve(init, "cuInit") && resolve(device_get_count, "cuDeviceGetCount") &&
              resolve(device_get, "cuDeviceGet") && resolve(primary_ctx_retain, "cuDevicePrimaryCtxRetain") &&
              resolve(primary_ctx_release, "cuDevicePrimaryCtxRelease_v2") &&
              resolve(ctx_get_current, "cuCtxGetCurrent") && resolve(ctx_set_current, "cuCtxSetCurrent") &&
              resolve(get_error_name, "cuGetErrorName") && resolve(mem_get_info, "cuMemGetInfo_v2") &&
              resolve(mem_get_granularity, "cuMemGetAllocationGranularity") &&
              resolve(mem_address_reserve, "cuMemAddressReserve") &&
              resolve(mem_address_free, "cuMemAddressFree") && resolve(mem_create, "cuMemCreate") &&
              resolve(mem_release, "cuMemRelease") && resolve(mem_map, "cuMemMap") &&
              resolve(mem_unmap, "cuMemUnmap") && resolve(mem_set_access, "cuMemSetAccess") &&
              resolve(event_synchronize, "cuEventSynchronize");
    if (!ok) {
      dlclose(lib);
      lib = nullptr;
    }
  }

  std::string result_name(CUresult r) const {
    const char* name = nullptr;
    if (lib && get_error_name && get_error_name(r, &name) == kSuccess && name) {
      return std::string(name) + " (" + std::to_string(r) + ")";
    }
    return "CUresult " + std::to_string(r);
  }

  void check(CUresult r, const std::string& call) const {
    if (r != kSuccess) throw DriverError(call + " failed: " + result_name(r));
  }
};

const Driver& driver() {
  static Driver d;
  return d;
}

// Why the cuda backend cannot run here, or "" when it can.
std::string cuda_unavailable_reason(int device) {
  const Driver& d = driver();
  if (!d.lib) return d.load_error;
  CUresult r = d.init(0);
  if (r != kSuccess) return "cuInit failed: " + d.result_name(r);
  int count = 0;
  r = d.device_get_count(&count);
  if (r != kSuccess) return "cuDeviceGetCount failed: " + d.result_name(r);
  if (count == 0) return "the driver reports no CUDA device";
  if (device < 0 || device >= count) {
    return "device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " present)";
  }
  return "";
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    std::string why = cuda_unavailable_reason(device);
    if (!why.empty()) {
      throw BackendUnavailableError("backend 'cuda' is unavailable: " + why +
                                    ". Install the NVIDIA driver and run on a GPU machine, or use backend='host'.");
    }
    const Driver& d = driver();
    d.check(d.device_get(&cu_device_, device), "cuDeviceGet");
    d.check(d.primary_ctx_retain(&context_, cu_device_), "cuDevicePrimaryCtxRetain");
    bind_thread();
    CuMemAllocationProp prop = allocation_prop();
    d.check(d.mem_get_granularity(&granularity_, &prop, kGranularityMinimum), "cuMemGetAllocationGranularity");
  }

  ~CudaBackend() override {
    const Driver& d = driver();
    for (CUmemHandle h : handles_) {
      if (h) d.mem_release(h);
    }
    d.primary_ctx_release(cu_device_);
  }

  std::string name() const override { return "cuda"; }
  int dlpack_device_type() const override { return 2; }
  int device_id() const override { return device_; }
  size_t granularity() const override { return granularity_; }

  void bind_thread() override {
    const Driver& d = driver();
    CUcontext current = nullptr;
    if (d.ctx_get_current(&current) == kSuccess && current == context_) return;
    d.check(d.ctx_set_current(context_), "cuCtxSetCurrent");
  }

  MemoryInfo memory_info() override {
    bind_thread();
    MemoryInfo info;
    driver().check(driver().mem_get_info(&info.free_bytes, &info.total_bytes), "cuMemGetInfo");
    return info;
  }

  void set_page_size(size_t page_size) override { page_size_ = page_size; }

  void create_page(int64_t page_id) override {
    if (static_cast<size_t>(page_id) >= handles_.size()) handles_.resize(page_id + 1, 0);
    CuMemAllocationProp prop = allocation_prop();
    driver().check(driver().mem_create(&handles_[page_id], page_size_, &prop, 0), "cuMemCreate");
  }

  void release_page(int64_t page_id) override {
    driver().check(driver().mem_release(handles_[page_id]), "cuMemRelease");
    handles_[page_id] = 0;
  }

  uintptr_t reserve(size_t bytes) override {
    CUdeviceptr ptr = 0;
    driver().check(driver().mem_address_reserve(&ptr, bytes, page_size_, 0, 0),
                   "cuMemAddressReserve of " + std::to_string(bytes) + " bytes");
    return static_cast<uintptr_t>(ptr);
  }

  void free_reservation(uintptr_t va, size_t bytes) noexcept override {
    driver().mem_address_free(static_cast<CUdeviceptr>(va), bytes);
  }

  void map_page(uintptr_t va, int64_t page_id) override {
    driver().check(driver().mem_map(static_cast<CUdeviceptr>(va), page_size_, 0, handles_[page_id], 0), "cuMemMap");
  }

  void set_access(uintptr_t va, size_t bytes) override {
    CuMemAccessDesc desc{};
    desc.location.type = kLocationDevice;
    desc.location.id = device_;
    desc.flags = kAccessReadWrite;
    driver().check(driver().mem_set_access(static_cast<CUdeviceptr>(va), bytes, &desc, 1), "cuMemSetAccess");
  }

  void unmap_page(uintptr_t va) override {
    driver().check(driver().mem_unmap(static_cast<CUdeviceptr>(va), page_size_), "cuMemUnmap");
  }

  void wait_event(uintptr_t event) override {
    if (event) driver().check(driver().event_synchronize(reinterpret_cast<void*>(event)), "cuEventSynchronize");
  }

 private:
  CuMemAllocationProp allocation_prop() const {
    CuMemAllocationProp prop{};
    prop.type = kAllocationPinned;
    prop.location.type = kLocationDevice;
    prop.location.id = device_;
    return prop;
  }

  int device_;
  CUdevice cu_device_ = 0;
  CUcontext context_ = nullptr;
  size_t granularity_ = 0;
  size_t page_size_ = 0;
  std::vector<CUmemHandle> handles_;
};

}  // namespace

bool cuda_backend_available() { return cuda_unavailable_reason(0).empty(); }

std::shared_ptr<Backend> make_cuda_backend(int device) { return std::make_shared<CudaBackend>(device); }

}  // namespace glake
