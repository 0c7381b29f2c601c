// Host backend: real virtual memory on the CPU.
//   reserve      mmap(PROT_NONE, private anonymous)         -- address space only
//   pool         one memfd; page i lives at file offset i * page_size, committed with fallocate
//   map_page     mmap(MAP_FIXED | MAP_SHARED, memfd, i * page_size), still PROT_NONE
//   set_access   mprotect(PROT_READ | PROT_WRITE) over a merged range
//   unmap_page   mmap(MAP_FIXED, PROT_NONE, anonymous) puts the hole back
// The same pool page mapped at two addresses shows one set of bytes through both: aliasing works
// exactly as on the GPU.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "backend.h"
#include "errors.h"

namespace glake {

std::string errno_text(int err) {
  const char* name = nullptr;
  switch (err) {
    case ENOMEM: name = "ENOMEM"; break;
    case ENOSPC: name = "ENOSPC"; break;
    case EFBIG: name = "EFBIG"; break;
    case EINVAL: name = "EINVAL"; break;
    case EACCES: name = "EACCES"; break;
    case EPERM: name = "EPERM"; break;
    case EMFILE: name = "EMFILE"; break;
    case EBADF: name = "EBADF"; break;
    case ENOSYS: name = "ENOSYS"; break;
    case EOPNOTSUPP: name = "EOPNOTSUPP"; break;
    default: break;
  }
  std::string text = name ? name : ("errno " + std::to_string(err));
  return text + " (" + std::strerror(err) + ")";
}

namespace {

[[noreturn]] void throw_errno(const std::string& call) {
  int err = errno;
  throw DriverError("host backend: " + call + " failed: " + errno_text(err));
}

class HostBackend final : public Backend {
 public:
  HostBackend() {
    fd_ = static_cast<int>(memfd_create("glake-page-pool", MFD_CLOEXEC));
    if (fd_ < 0) throw_errno("memfd_create");
  }
  ~HostBackend() override {
    if (fd_ >= 0) close(fd_);
  }

  std::string name() const override { return "host"; }
  int dlpack_device_type() const override { return 1; }
  int device_id() const override { return 0; }
  size_t granularity() const override { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

  MemoryInfo memory_info() override {
    // MemAvailable from /proc/meminfo (lines are "Key:   value kB", some without a unit); the
    // sysconf figures where it is missing.
    MemoryInfo info;
    size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    info.total_bytes = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * page;
    info.free_bytes = static_cast<size_t>(sysconf(_SC_AVPHYS_PAGES)) * page;
    std::ifstream meminfo("/proc/meminfo");
    std::string line;
    while (std::getline(meminfo, line)) {
      unsigned long long kib = 0;
      if (std::sscanf(line.c_str(), "MemAvailable: %llu", &kib) == 1) info.free_bytes = kib * 1024;
    }
    return info;
  }

  void set_page_size(size_t page_size) override { page_size_ = page_size; }

  void check_capacity(size_t bytes) override {
    MemoryInfo info = memory_info();
    if (bytes > info.free_bytes) {
      throw PoolExhaustedError("host backend: cannot create " + std::to_string(bytes >> 20) + " MiB of pool pages: only " +
                               std::to_string(info.free_bytes >> 20) + " MiB of memory is available. Ask for a smaller pool.");
    }
  }

  void create_page(int64_t page_id) override {
    off_t offset = static_cast<off_t>(page_id) * static_cast<off_t>(page_size_);
    off_t end = offset + static_cast<off_t>(page_size_);
    if (end > file_size_) {
      if (ftruncate(fd_, end) != 0) throw_errno("ftruncate of the page pool to " + std::to_string(end) + " bytes");
      file_size_ = end;
    }
    // Commit the memory now, so running out shows here as an error and never later as SIGBUS.
    if (fallocate(fd_, 0, offset, static_cast<off_t>(page_size_)) != 0) {
      throw_errno("fallocate of pool page " + std::to_string(page_id));
    }
  }

  void release_page(int64_t page_id) override {
    off_t offset = static_cast<off_t>(page_id) * static_cast<off_t>(page_size_);
    if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, static_cast<off_t>(page_size_)) != 0) {
      throw_errno("fallocate(PUNCH_HOLE) of pool page " + std::to_string(page_id));
    }
  }

  void close_pool() override {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

  uintptr_t reserve(size_t bytes) override {
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw_errno("mmap reserve of " + std::to_string(bytes) + " bytes");
    return reinterpret_cast<uintptr_t>(p);
  }

  void free_reservation(uintptr_t va, size_t bytes) noexcept override {
    munmap(reinterpret_cast<void*>(va), bytes);
  }

  void map_page(uintptr_t va, int64_t page_id) override {
    off_t offset = static_cast<off_t>(page_id) * static_cast<off_t>(page_size_);
    void* p = mmap(reinterpret_cast<void*>(va), page_size_, PROT_NONE, MAP_SHARED | MAP_FIXED, fd_, offset);
    if (p == MAP_FAILED) throw_errno("mmap of pool page " + std::to_string(page_id));
  }

  void set_access(uintptr_t va, size_t bytes) override {
    if (mprotect(reinterpret_cast<void*>(va), bytes, PROT_READ | PROT_WRITE) != 0) throw_errno("mprotect");
  }

  void unmap_page(uintptr_t va) override {
    void* p = mmap(reinterpret_cast<void*>(va), page_size_, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw_errno("mmap(PROT_NONE) unmap");
  }

 private:
  int fd_ = -1;
  size_t page_size_ = 0;
  off_t file_size_ = 0;
};

}  // namespace

std::shared_ptr<Backend> make_host_backend() { return std::make_shared<HostBackend>(); }

}  // namespace glake
