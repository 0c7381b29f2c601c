// The allocator: a pool of physical pages (created when the pool grows, never on the mapping path),
// vTensors (reserved virtual ranges) and the page tables between them, plus a worker thread that
// executes queued map / unmap / alias / grow jobs in submission order.
// Mechanism only: callers (glakeserve/kv_cache.py) decide which pages go where.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"

namespace glake {

// [first, first + count) virtual pages of one vTensor.
struct PageRange {
  int64_t vtensor;
  int64_t first;
  int64_t count;
};

// Map src's pages [src_first, src_first + count) again at dst's pages [dst_first, ...).
struct AliasRange {
  int64_t dst;
  int64_t dst_first;
  int64_t src;
  int64_t src_first;
  int64_t count;
};

// A reserved virtual range. Shared with every tensor view over it, so the address space stays
// reserved until the last view is gone even when the vTensor was released earlier.
struct Reservation {
  std::shared_ptr<Backend> backend;
  uintptr_t va;
  size_t bytes;
  ~Reservation();
};

struct PoolStats {
  std::string backend;
  int device = 0;
  size_t page_size = 0;
  int64_t total_pages = 0;    // physical pages that exist now
  int64_t free_pages = 0;     // ... of which no vTensor maps
  int64_t used_pages = 0;     // ... of which at least one vTensor maps
  int64_t shared_pages = 0;   // ... of which two or more mappings share (aliases)
  int64_t mappings = 0;       // virtual pages backed, all vTensors together (counts aliases twice)
  int64_t num_vtensors = 0;
  size_t reserved_bytes = 0;  // virtual space reserved by live vTensors
  int64_t pages_mapped = 0;   // running counters since start-up
  int64_t pages_unmapped = 0;
  int64_t pages_aliased = 0;
  int64_t set_access_calls = 0;
  int64_t pages_created = 0;
  int64_t pages_released = 0;
  int64_t async_jobs = 0;
  int64_t async_pages = 0;
  int64_t sync_driver_calls = 0;  // driver calls made for a synchronous call (the caller waited on them)
  int64_t waits = 0;          // times a caller had to block on the worker
  double wait_seconds = 0.0;
  double map_seconds = 0.0;   // time inside the backend's map / set-access / unmap calls
  double set_access_seconds = 0.0;
  double unmap_seconds = 0.0;
};

struct VTensorInfo {
  int64_t id = 0;
  uintptr_t address = 0;
  size_t reserved_bytes = 0;
  int64_t num_pages = 0;
  std::vector<int64_t> mapped_pages;    // virtual page indices, ascending
  std::vector<int64_t> physical_pages;  // the pool page behind each of them
  int64_t shared_pages = 0;             // mapped pages that another mapping shares
  int64_t pending_jobs = 0;
};

enum class JobKind { kMap, kUnmap, kAlias, kGrow };

// One queued job; Python holds it as a MapFuture. Before its driver calls the worker waits for
// `after_event` (a device event, 0 for none): an unmap then never pulls a page from under a kernel
// that was queued before it.
struct Job {
  JobKind kind;
  std::vector<PageRange> ranges;    // map, unmap
  std::vector<AliasRange> aliases;  // alias
  int64_t grow_pages = 0;           // grow
  uintptr_t after_event = 0;
  bool synchronous = false;  // submitted by a synchronous call that waits for it: not an async job
  int64_t pages = 0;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::exception_ptr error;
};

class Allocator {
 public:
  // backend: "auto" (cuda when a GPU is present, else host), "cuda" or "host". page_size 0 means
  // the default (the driver's granularity on cuda, 2 MiB on host).
  Allocator(const std::string& backend, int device, size_t page_size, int64_t num_pages);
  ~Allocator();
  void close();
  bool closed() const { return closed_; }

  const std::string& backend_name() const { return backend_name_; }
  int dlpack_device_type() const;
  int device_id() const;
  size_t page_size() const { return page_size_; }
  MemoryInfo memory_info();

  int64_t reserve(size_t bytes);
  void release(int64_t vtensor);
  void map(const std::vector<PageRange>& ranges);
  void unmap(const std::vector<PageRange>& ranges);
  void alias(const std::vector<AliasRange>& ranges);
  std::shared_ptr<Job> submit(JobKind kind, std::vector<PageRange> ranges, std::vector<AliasRange> aliases = {},
                              int64_t grow_pages = 0, uintptr_t after_event = 0);
  void wait(const std::shared_ptr<Job>& job);

  int64_t grow(int64_t pages);
  int64_t shrink(int64_t pages);

  PoolStats stats();
  int64_t free_pages();
  // Stats, every vTensor's info and the page refcounts, all read under one lock: a consistent view
  // even while the worker maps.
  struct Snapshot {
    PoolStats stats;
    std::vector<VTensorInfo> vtensors;
    std::vector<std::optional<int32_t>> refcounts;
  };
  Snapshot snapshot();
  VTensorInfo info(int64_t vtensor);
  std::vector<int64_t> vtensor_ids();
  std::vector<std::optional<int32_t>> page_refcounts();  // None for pages that do not exist now
  std::shared_ptr<Reservation> reservation(int64_t vtensor);

 private:
  struct VTensor {
    std::shared_ptr<Reservation> reservation;
    std::vector<int64_t> pages;  // pool page per virtual page; kNoPage where unmapped
    int64_t pending = 0;         // queued worker jobs that touch this vTensor
    bool busy = false;           // an operation is in its driver calls (outside the lock)
  };
  static constexpr int64_t kNoPage = -1;
  class BusyGuard;
  // One page of an operation: where it goes and which pool page is behind it.
  struct Step {
    int64_t vtensor;
    int64_t page_index;
    int64_t pool_page;
    uintptr_t va;
  };

  // Every operation runs in three steps: under the lock, claim its vTensors and update the books;
  // without the lock, make the driver calls; under the lock again, commit or roll back. So the
  // worker's driver calls never block a caller that submits, maps another vTensor, or reads stats.
  void claim(std::unique_lock<std::mutex>& lock, const std::vector<int64_t>& ids, bool from_worker);
  void run_map(std::unique_lock<std::mutex>& lock, const std::vector<PageRange>& ranges, bool from_worker);
  void run_unmap(std::unique_lock<std::mutex>& lock, const std::vector<PageRange>& ranges, bool from_worker);
  void run_alias(std::unique_lock<std::mutex>& lock, const std::vector<AliasRange>& ranges, bool from_worker);
  void map_steps(std::unique_lock<std::mutex>& lock, const std::vector<Step>& steps, int64_t* committed,
                 bool from_worker);
  void unmap_steps(std::unique_lock<std::mutex>& lock, const std::vector<Step>& steps, bool from_worker);
  int64_t grow_locked(int64_t pages);  // mu_ held; creates the pages
  void run_job(Job& job);

  VTensor& find(int64_t id);
  void check_open() const;
  void check_range(int64_t id, const VTensor& vt, int64_t first, int64_t count) const;
  void grant_access(std::vector<std::pair<uintptr_t, size_t>> spans, double* seconds, int64_t* calls);
  int64_t take_free_page();
  void drop_reference(int64_t page);
  void worker_loop();
  std::string describe_pool() const;
  PoolStats stats_locked() const;
  VTensorInfo info_locked(int64_t id, const VTensor& vt) const;

  std::shared_ptr<Backend> backend_;
  std::string backend_name_;
  size_t page_size_ = 0;
  bool closed_ = false;

  std::mutex mu_;                      // guards everything below
  std::condition_variable idle_cv_;    // a vTensor's pending count dropped or its busy mark cleared
  std::map<int64_t, VTensor> vtensors_;
  int64_t next_id_ = 1;
  std::vector<int32_t> refcount_;      // mappings per pool page
  std::vector<bool> present_;          // physical page exists
  std::set<int64_t> free_;             // present pages with refcount 0
  PoolStats counters_;

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace glake
