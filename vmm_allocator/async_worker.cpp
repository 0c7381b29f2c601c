// The asynchronous half of the allocator: a job queue and the one worker thread that runs it.
// Jobs run in submission order; a caller polls or waits on a job, and the job's error (if any)
// is rethrown in the caller's thread on wait.
#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "allocator.h"

namespace glake {

// The vTensors a job touches, once each (their pending counts keep synchronous calls in order).
static std::vector<int64_t> job_vtensors(const Job& job) {
  std::vector<int64_t> ids;
  auto add = [&](int64_t id) {
    if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
  };
  for (const auto& r : job.ranges) add(r.vtensor);
  for (const auto& a : job.aliases) {
    add(a.dst);
    add(a.src);
  }
  return ids;
}

std::shared_ptr<Job> Allocator::submit(JobKind kind, std::vector<PageRange> ranges, std::vector<AliasRange> aliases,
                                       int64_t grow_pages, uintptr_t after_event) {
  if (grow_pages < 0) throw std::invalid_argument("cannot grow the pool by a negative number of pages");
  auto job = std::make_shared<Job>();
  job->kind = kind;
  job->ranges = std::move(ranges);
  job->aliases = std::move(aliases);
  job->grow_pages = grow_pages;
  job->after_event = after_event;
  {
    std::lock_guard<std::mutex> lock(mu_);
    check_open();
    auto ids = job_vtensors(*job);
    for (int64_t id : ids) find(id);  // unknown vTensors fail here, at once
    for (int64_t id : ids) vtensors_.at(id).pending += 1;
    for (const auto& r : job->ranges) job->pages += std::max<int64_t>(r.count, 0);
    for (const auto& a : job->aliases) job->pages += std::max<int64_t>(a.count, 0);
    job->pages += grow_pages;
  }
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    queue_.push_back(job);
  }
  queue_cv_.notify_one();
  return job;
}

void Allocator::wait(const std::shared_ptr<Job>& job) {
  std::unique_lock<std::mutex> lock(job->mu);
  if (!job->done) {
    auto start = std::chrono::steady_clock::now();
    job->cv.wait(lock, [&] { return job->done; });
    std::lock_guard<std::mutex> stats_lock(mu_);
    counters_.waits += 1;
    counters_.wait_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  if (job->error) std::rethrow_exception(job->error);
}

void Allocator::worker_loop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(queue_mu_);
      queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and everything queued is done
      job = queue_.front();
      queue_.pop_front();
    }
    run_job(*job);
    idle_cv_.notify_all();
    {
      std::lock_guard<std::mutex> lock(job->mu);
      job->done = true;
    }
    job->cv.notify_all();
  }
}

void Allocator::run_job(Job& job) {
  std::exception_ptr error;
  if (job.after_event) {  // outside every lock: kernels queued before the job may still read its pages
    try {
      backend_->bind_thread();
      backend_->wait_event(job.after_event);
    } catch (...) {
      error = std::current_exception();
    }
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (!error) {
    try {
      switch (job.kind) {
        case JobKind::kMap: run_map(lock, job.ranges, true); break;
        case JobKind::kUnmap: run_unmap(lock, job.ranges, true); break;
        case JobKind::kAlias: run_alias(lock, job.aliases, true); break;
        case JobKind::kGrow: grow_locked(job.grow_pages); break;
      }
    } catch (...) {
      error = std::current_exception();
    }
  }
  job.error = error;
  for (int64_t id : job_vtensors(job)) {  // run_* return and throw with the lock held
    auto it = vtensors_.find(id);
    if (it != vtensors_.end()) it->second.pending -= 1;
  }
  if (!job.synchronous) {
    counters_.async_jobs += 1;
    counters_.async_pages += job.pages;
  }
}

}  // namespace glake
