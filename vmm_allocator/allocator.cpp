#include "allocator.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <stdexcept>

#include "errors.h"

namespace glake {
namespace {

constexpr size_t kDefaultHostPageSize = size_t(2) << 20;

std::string format_bytes(size_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char text[32];
  if (value == static_cast<double>(static_cast<int64_t>(value))) {
    std::snprintf(text, sizeof(text), "%lld %s", static_cast<long long>(value), units[unit]);
  } else {
    std::snprintf(text, sizeof(text), "%.1f %s", value, units[unit]);
  }
  return text;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Reservation::~Reservation() {
  try {
    backend->bind_thread();
  } catch (...) {
  }
  backend->free_reservation(va, bytes);
}

Allocator::Allocator(const std::string& backend, int device, size_t page_size, int64_t num_pages) {
  if (backend == "cuda" || (backend == "auto" && cuda_backend_available())) {
    backend_ = make_cuda_backend(device);
  } else if (backend == "host" || backend == "auto") {
    backend_ = make_host_backend();
  } else {
    throw std::invalid_argument("unknown backend '" + backend + "': use 'auto', 'cuda' or 'host'");
  }
  backend_name_ = backend_->name();
  size_t granularity = backend_->granularity();
  if (page_size == 0) page_size = backend_name_ == "cuda" ? granularity : kDefaultHostPageSize;
  if (page_size % granularity != 0) {
    throw std::invalid_argument("page size " + std::to_string(page_size) + " is not a multiple of the " +
                                backend_name_ + " backend's granularity (" + format_bytes(granularity) + ")");
  }
  if (num_pages < 0) throw std::invalid_argument("num_pages must be >= 0, got " + std::to_string(num_pages));
  page_size_ = page_size;
  backend_->set_page_size(page_size);
  counters_.backend = backend_name_;
  counters_.device = backend_->device_id();
  counters_.page_size = page_size;
  if (num_pages) {
    std::lock_guard<std::mutex> lock(mu_);
    grow_locked(num_pages);
  }
  worker_ = std::thread([this] { worker_loop(); });
}

Allocator::~Allocator() { close(); }

// Marks vTensors busy for one operation; clears the marks on scope exit. The lock must be held
// whenever a BusyGuard is destroyed (the run_* functions re-lock before leaving on every path).
class Allocator::BusyGuard {
 public:
  BusyGuard(Allocator* allocator, std::vector<int64_t> ids) : allocator_(allocator), ids_(std::move(ids)) {}
  ~BusyGuard() {
    for (int64_t id : ids_) {
      auto it = allocator_->vtensors_.find(id);
      if (it != allocator_->vtensors_.end()) it->second.busy = false;
    }
    allocator_->idle_cv_.notify_all();
  }

 private:
  Allocator* allocator_;
  std::vector<int64_t> ids_;
};

void Allocator::close() {
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  queue_cv_.notify_all();
  if (worker_.joinable()) worker_.join();  // the worker drains its queue first
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [&] {
    for (const auto& [id, vt] : vtensors_) {
      if (vt.busy) return false;
    }
    return true;
  });
  try {
    backend_->bind_thread();
  } catch (...) {
  }
  for (auto& [id, vt] : vtensors_) {
    for (size_t p = 0; p < vt.pages.size(); ++p) {
      if (vt.pages[p] == kNoPage) continue;
      try {
        backend_->unmap_page(vt.reservation->va + p * page_size_);
      } catch (...) {
      }
    }
  }
  vtensors_.clear();
  for (size_t page = 0; page < present_.size(); ++page) {
    if (!present_[page]) continue;
    try {
      backend_->release_page(static_cast<int64_t>(page));
    } catch (...) {
    }
    present_[page] = false;
  }
  free_.clear();
  backend_->close_pool();
  closed_ = true;
}

int Allocator::dlpack_device_type() const { return backend_->dlpack_device_type(); }
int Allocator::device_id() const { return backend_->device_id(); }
MemoryInfo Allocator::memory_info() { return backend_->memory_info(); }

void Allocator::check_open() const {
  if (closed_) throw VmmError("the page pool is closed; create a new one");
}

Allocator::VTensor& Allocator::find(int64_t id) {
  check_open();
  auto it = vtensors_.find(id);
  if (it == vtensors_.end()) {
    throw OutOfRangeError("vTensor " + std::to_string(id) + " does not exist (released, or never reserved)");
  }
  return it->second;
}

void Allocator::check_range(int64_t id, const VTensor& vt, int64_t first, int64_t count) const {
  int64_t num_pages = static_cast<int64_t>(vt.pages.size());
  if (first < 0 || count < 0 || first + count > num_pages) {
    throw OutOfRangeError("out of range: vTensor " + std::to_string(id) + " has pages [0, " +
                          std::to_string(num_pages) + ") (" + format_bytes(vt.reservation->bytes) +
                          " reserved), asked for [" + std::to_string(first) + ", " +
                          std::to_string(first + count) + ")");
  }
}

std::string Allocator::describe_pool() const {
  return std::to_string(free_.size()) + " of " + std::to_string(std::count(present_.begin(), present_.end(), true)) +
         " pages free (" + format_bytes(page_size_) + " each)";
}

// Waits until no other operation is inside its driver calls on these vTensors -- and, for callers
// other than the worker, until their queued jobs ran (so calls on one vTensor keep their order) --
// then marks them busy. Unknown vTensors throw once the wait is over.
void Allocator::claim(std::unique_lock<std::mutex>& lock, const std::vector<int64_t>& ids, bool from_worker) {
  auto blocked = [&] {
    for (int64_t id : ids) {
      auto it = vtensors_.find(id);
      if (it != vtensors_.end() && (it->second.busy || (!from_worker && it->second.pending > 0))) return true;
    }
    return false;
  };
  if (blocked()) {
    auto start = std::chrono::steady_clock::now();
    idle_cv_.wait(lock, [&] { return !blocked(); });
    if (!from_worker) {
      counters_.waits += 1;
      counters_.wait_seconds += seconds_since(start);
    }
  }
  for (int64_t id : ids) find(id);
  for (int64_t id : ids) vtensors_.at(id).busy = true;
}

int64_t Allocator::reserve(size_t bytes) {
  if (bytes == 0) throw std::invalid_argument("cannot reserve a vTensor of 0 bytes");
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  size_t num_pages = (bytes + page_size_ - 1) / page_size_;
  size_t rounded = num_pages * page_size_;
  backend_->bind_thread();
  auto reservation = std::make_shared<Reservation>();
  reservation->backend = backend_;
  reservation->bytes = rounded;
  reservation->va = backend_->reserve(rounded);
  int64_t id = next_id_++;
  vtensors_[id] = VTensor{reservation, std::vector<int64_t>(num_pages, kNoPage), 0, false};
  return id;
}

void Allocator::release(int64_t id) {
  std::unique_lock<std::mutex> lock(mu_);
  claim(lock, {id}, false);  // waits for the vTensor's queued jobs
  BusyGuard guard(this, {id});
  VTensor& vt = vtensors_.at(id);
  std::vector<Step> steps;
  for (int64_t p = 0; p < static_cast<int64_t>(vt.pages.size()); ++p) {
    if (vt.pages[p] != kNoPage) steps.push_back({id, p, vt.pages[p], vt.reservation->va + static_cast<size_t>(p) * page_size_});
  }
  unmap_steps(lock, steps, false);
  vtensors_.erase(id);
}

void Allocator::map(const std::vector<PageRange>& ranges) {
  std::unique_lock<std::mutex> lock(mu_);
  run_map(lock, ranges, false);
}

void Allocator::unmap(const std::vector<PageRange>& ranges) {
  std::unique_lock<std::mutex> lock(mu_);
  run_unmap(lock, ranges, false);
}

int64_t Allocator::take_free_page() {
  int64_t page = *free_.begin();
  free_.erase(free_.begin());
  return page;
}

void Allocator::drop_reference(int64_t page) {
  if (--refcount_[page] == 0) free_.insert(page);
}

// Grants access once per maximal run of adjacent virtual addresses, so a batch pays one driver
// call per run rather than one per page. Called without the lock.
void Allocator::grant_access(std::vector<std::pair<uintptr_t, size_t>> spans, double* seconds, int64_t* calls) {
  std::sort(spans.begin(), spans.end());
  size_t i = 0;
  while (i < spans.size()) {
    uintptr_t start = spans[i].first;
    uintptr_t end = start + spans[i].second;
    size_t j = i + 1;
    while (j < spans.size() && spans[j].first == end) end += spans[j++].second;
    auto t0 = std::chrono::steady_clock::now();
    backend_->set_access(start, end - start);
    *seconds += seconds_since(t0);
    *calls += 1;
    i = j;
  }
}

void Allocator::run_map(std::unique_lock<std::mutex>& lock, const std::vector<PageRange>& ranges, bool from_worker) {
  std::vector<int64_t> ids;
  for (const auto& r : ranges) ids.push_back(r.vtensor);
  claim(lock, ids, from_worker);
  BusyGuard guard(this, ids);
  // 1. Validate the whole batch before touching anything, so a bad batch changes nothing.
  std::set<std::pair<int64_t, int64_t>> seen;
  size_t needed = 0;
  for (const auto& r : ranges) {
    VTensor& vt = find(r.vtensor);
    check_range(r.vtensor, vt, r.first, r.count);
    for (int64_t p = r.first; p < r.first + r.count; ++p) {
      if (vt.pages[p] != kNoPage) {
        throw AlreadyMappedError("page " + std::to_string(p) + " of vTensor " + std::to_string(r.vtensor) +
                                 " is already mapped (pool page " + std::to_string(vt.pages[p]) +
                                 "); unmap it first");
      }
      if (!seen.insert({r.vtensor, p}).second) {
        throw AlreadyMappedError("page " + std::to_string(p) + " of vTensor " + std::to_string(r.vtensor) +
                                 " appears twice in one map batch");
      }
    }
    needed += static_cast<size_t>(r.count);
  }
  if (needed > free_.size()) {
    throw PoolExhaustedError("page pool exhausted: mapping needs " + std::to_string(needed) + " pages but " +
                             describe_pool() + ". Unmap or release vTensors, or create a larger pool.");
  }
  std::vector<Step> steps;
  for (const auto& r : ranges) {
    VTensor& vt = vtensors_.at(r.vtensor);
    for (int64_t p = r.first; p < r.first + r.count; ++p) {
      int64_t page = take_free_page();
      vt.pages[p] = page;
      refcount_[page] = 1;
      steps.push_back({r.vtensor, p, page, vt.reservation->va + static_cast<size_t>(p) * page_size_});
    }
  }
  map_steps(lock, steps, &counters_.pages_mapped, from_worker);
}

// Driver calls for steps whose books are already written: map each page and grant access, without
// the lock; then, locked again, count them into *committed, or undo the books and rethrow.
void Allocator::map_steps(std::unique_lock<std::mutex>& lock, const std::vector<Step>& steps, int64_t* committed,
                          bool from_worker) {
  lock.unlock();
  double map_seconds = 0, access_seconds = 0;
  int64_t access_calls = 0;
  size_t mapped = 0;
  std::exception_ptr error;
  try {
    backend_->bind_thread();
    std::vector<std::pair<uintptr_t, size_t>> spans;
    for (const Step& s : steps) {
      auto t0 = std::chrono::steady_clock::now();
      backend_->map_page(s.va, s.pool_page);
      map_seconds += seconds_since(t0);
      ++mapped;
      spans.push_back({s.va, page_size_});
    }
    grant_access(std::move(spans), &access_seconds, &access_calls);
  } catch (...) {
    error = std::current_exception();
    for (size_t i = 0; i < mapped; ++i) {
      try {
        backend_->unmap_page(steps[i].va);
      } catch (...) {
      }
    }
  }
  lock.lock();
  counters_.map_seconds += map_seconds;
  counters_.set_access_seconds += access_seconds;
  counters_.set_access_calls += access_calls;
  if (!from_worker) counters_.sync_driver_calls += static_cast<int64_t>(mapped) + access_calls;
  if (error) {
    for (const Step& s : steps) {
      vtensors_.at(s.vtensor).pages[s.page_index] = kNoPage;
      drop_reference(s.pool_page);
    }
    std::rethrow_exception(error);
  }
  *committed += static_cast<int64_t>(steps.size());
}

void Allocator::run_unmap(std::unique_lock<std::mutex>& lock, const std::vector<PageRange>& ranges,
                          bool from_worker) {
  std::vector<int64_t> ids;
  for (const auto& r : ranges) ids.push_back(r.vtensor);
  claim(lock, ids, from_worker);
  BusyGuard guard(this, ids);
  std::set<std::pair<int64_t, int64_t>> seen;
  std::vector<Step> steps;
  for (const auto& r : ranges) {
    VTensor& vt = find(r.vtensor);
    check_range(r.vtensor, vt, r.first, r.count);
    for (int64_t p = r.first; p < r.first + r.count; ++p) {
      if (vt.pages[p] == kNoPage) {
        throw NotMappedError("page " + std::to_string(p) + " of vTensor " + std::to_string(r.vtensor) +
                             " is not mapped; there is nothing to unmap");
      }
      if (!seen.insert({r.vtensor, p}).second) {
        throw NotMappedError("page " + std::to_string(p) + " of vTensor " + std::to_string(r.vtensor) +
                             " appears twice in one unmap batch");
      }
      steps.push_back({r.vtensor, p, vt.pages[p], vt.reservation->va + static_cast<size_t>(p) * page_size_});
    }
  }
  unmap_steps(lock, steps, from_worker);
}

// Unmaps each step's page without the lock; locked again, drops the references of those that were
// unmapped (they stay unmapped even when a later one fails) and rethrows the first error.
void Allocator::unmap_steps(std::unique_lock<std::mutex>& lock, const std::vector<Step>& steps, bool from_worker) {
  lock.unlock();
  double seconds = 0;
  size_t unmapped = 0;
  std::exception_ptr error;
  try {
    backend_->bind_thread();
    for (const Step& s : steps) {
      auto t0 = std::chrono::steady_clock::now();
      backend_->unmap_page(s.va);
      seconds += seconds_since(t0);
      ++unmapped;
    }
  } catch (...) {
    error = std::current_exception();
  }
  lock.lock();
  counters_.unmap_seconds += seconds;
  for (size_t i = 0; i < unmapped; ++i) {
    vtensors_.at(steps[i].vtensor).pages[steps[i].page_index] = kNoPage;
    drop_reference(steps[i].pool_page);
  }
  counters_.pages_unmapped += static_cast<int64_t>(unmapped);
  if (!from_worker) counters_.sync_driver_calls += static_cast<int64_t>(unmapped);
  if (error) std::rethrow_exception(error);
}

void Allocator::alias(const std::vector<AliasRange>& ranges) {
  std::unique_lock<std::mutex> lock(mu_);
  run_alias(lock, ranges, false);
}

void Allocator::run_alias(std::unique_lock<std::mutex>& lock, const std::vector<AliasRange>& ranges,
                          bool from_worker) {
  std::vector<int64_t> ids;
  for (const auto& r : ranges) {
    if (std::find(ids.begin(), ids.end(), r.dst) == ids.end()) ids.push_back(r.dst);
    if (std::find(ids.begin(), ids.end(), r.src) == ids.end()) ids.push_back(r.src);
  }
  claim(lock, ids, from_worker);
  BusyGuard guard(this, ids);
  std::set<std::pair<int64_t, int64_t>> seen;
  for (const auto& r : ranges) {
    VTensor& src = find(r.src);
    VTensor& dst = find(r.dst);
    check_range(r.src, src, r.src_first, r.count);
    check_range(r.dst, dst, r.dst_first, r.count);
    for (int64_t i = 0; i < r.count; ++i) {
      int64_t s = r.src_first + i, d = r.dst_first + i;
      if (src.pages[s] == kNoPage) {
        throw NotMappedError("page " + std::to_string(s) + " of vTensor " + std::to_string(r.src) +
                             " is not mapped, so it cannot be aliased; map it first");
      }
      if (dst.pages[d] != kNoPage) {
        throw AlreadyMappedError("page " + std::to_string(d) + " of vTensor " + std::to_string(r.dst) +
                                 " is already mapped (pool page " + std::to_string(dst.pages[d]) +
                                 "); unmap it before aliasing onto it");
      }
      if (!seen.insert({r.dst, d}).second) {
        throw AlreadyMappedError("page " + std::to_string(d) + " of vTensor " + std::to_string(r.dst) +
                                 " appears twice in one alias batch");
      }
    }
  }
  std::vector<Step> steps;
  for (const auto& r : ranges) {
    VTensor& src = vtensors_.at(r.src);
    VTensor& dst = vtensors_.at(r.dst);
    for (int64_t i = 0; i < r.count; ++i) {
      int64_t page = src.pages[r.src_first + i];
      int64_t d = r.dst_first + i;
      dst.pages[d] = page;
      refcount_[page] += 1;
      steps.push_back({r.dst, d, page, dst.reservation->va + static_cast<size_t>(d) * page_size_});
    }
  }
  map_steps(lock, steps, &counters_.pages_aliased, from_worker);
}

// Growing creates physical pages, which the backend keeps in a table the worker reads while it maps:
// so pages are only ever created on the worker (or before it starts), never beside a running job.
int64_t Allocator::grow(int64_t pages) {
  if (pages < 0) throw std::invalid_argument("cannot grow the pool by a negative number of pages");
  auto job = std::make_shared<Job>();
  job->kind = JobKind::kGrow;
  job->grow_pages = pages;
  job->pages = pages;
  job->synchronous = true;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (stopping_) throw VmmError("the page pool is closed; create a new one");
    queue_.push_back(job);
  }
  queue_cv_.notify_one();
  std::unique_lock<std::mutex> job_lock(job->mu);
  job->cv.wait(job_lock, [&] { return job->done; });
  job_lock.unlock();
  if (job->error) std::rethrow_exception(job->error);
  std::lock_guard<std::mutex> lock(mu_);
  counters_.sync_driver_calls += pages;
  return pages;
}

int64_t Allocator::grow_locked(int64_t pages) {
  if (pages < 0) throw std::invalid_argument("cannot grow the pool by a negative number of pages");
  check_open();
  backend_->bind_thread();
  backend_->check_capacity(static_cast<size_t>(pages) * page_size_);
  std::vector<int64_t> created;
  try {
    size_t scan = 0;
    for (int64_t i = 0; i < pages; ++i) {
      while (scan < present_.size() && present_[scan]) ++scan;  // reuse ids of released pages first
      int64_t page = static_cast<int64_t>(scan);
      backend_->create_page(page);
      if (scan == present_.size()) {
        present_.push_back(true);
        refcount_.push_back(0);
      } else {
        present_[scan] = true;
        refcount_[scan] = 0;
      }
      free_.insert(page);
      created.push_back(page);
    }
  } catch (...) {
    for (int64_t page : created) {
      try {
        backend_->release_page(page);
      } catch (...) {
      }
      present_[page] = false;
      free_.erase(page);
    }
    throw;
  }
  counters_.pages_created += pages;
  return pages;
}

int64_t Allocator::shrink(int64_t pages) {
  if (pages < 0) throw std::invalid_argument("cannot shrink the pool by a negative number of pages");
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  backend_->bind_thread();
  int64_t released = 0;
  while (released < pages && !free_.empty()) {  // highest ids first keeps the pool dense
    int64_t page = *free_.rbegin();
    backend_->release_page(page);
    free_.erase(page);
    present_[page] = false;
    ++released;
  }
  counters_.pages_released += released;
  counters_.sync_driver_calls += released;
  return released;
}

PoolStats Allocator::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_locked();
}

PoolStats Allocator::stats_locked() const {
  PoolStats s = counters_;
  s.total_pages = std::count(present_.begin(), present_.end(), true);
  s.free_pages = static_cast<int64_t>(free_.size());
  s.used_pages = s.total_pages - s.free_pages;
  for (size_t page = 0; page < refcount_.size(); ++page) {
    if (!present_[page]) continue;
    s.mappings += refcount_[page];
    if (refcount_[page] > 1) s.shared_pages += 1;
  }
  s.num_vtensors = static_cast<int64_t>(vtensors_.size());
  for (const auto& [id, vt] : vtensors_) s.reserved_bytes += vt.reservation->bytes;
  return s;
}

int64_t Allocator::free_pages() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(free_.size());
}

VTensorInfo Allocator::info(int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  return info_locked(id, find(id));
}

VTensorInfo Allocator::info_locked(int64_t id, const VTensor& vt) const {
  VTensorInfo info;
  info.id = id;
  info.address = vt.reservation->va;
  info.reserved_bytes = vt.reservation->bytes;
  info.num_pages = static_cast<int64_t>(vt.pages.size());
  info.pending_jobs = vt.pending;
  for (int64_t p = 0; p < info.num_pages; ++p) {
    if (vt.pages[p] == kNoPage) continue;
    info.mapped_pages.push_back(p);
    info.physical_pages.push_back(vt.pages[p]);
    if (refcount_[vt.pages[p]] > 1) info.shared_pages += 1;
  }
  return info;
}

Allocator::Snapshot Allocator::snapshot() {
  std::lock_guard<std::mutex> lock(mu_);
  Snapshot snap;
  snap.stats = stats_locked();
  for (const auto& [id, vt] : vtensors_) snap.vtensors.push_back(info_locked(id, vt));
  snap.refcounts.resize(present_.size());
  for (size_t page = 0; page < present_.size(); ++page) {
    if (present_[page]) snap.refcounts[page] = refcount_[page];
  }
  return snap;
}

std::vector<int64_t> Allocator::vtensor_ids() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> ids;
  for (const auto& [id, vt] : vtensors_) ids.push_back(id);
  return ids;
}

std::vector<std::optional<int32_t>> Allocator::page_refcounts() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::optional<int32_t>> out(present_.size());
  for (size_t page = 0; page < present_.size(); ++page) {
    if (present_[page]) out[page] = refcount_[page];
  }
  return out;
}

std::shared_ptr<Reservation> Allocator::reservation(int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  return find(id).reservation;
}

}  // namespace glake
