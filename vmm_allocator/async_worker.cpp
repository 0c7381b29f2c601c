// The asynchronous half of the allocator: a job queue and the one worker thread that runs it.
// Jobs run in submission order; a caller polls or waits on a job, and the job's error (if any)
// is rethrown in the caller's thread on wait.
#include <chrono>

#include "allocator.h"

namespace glake {

std::shared_ptr<Job> Allocator::submit(JobKind kind, std::vector<PageRange> ranges) {
  auto job = std::make_shared<Job>();
  job->kind = kind;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& r : ranges) find(r.vtensor);  // unknown vTensors fail here, at once
    for (const auto& r : ranges) {
      vtensors_.at(r.vtensor).pending += 1;
      job->pages += std::max<int64_t>(r.count, 0);
    }
  }
  job->ranges = std::move(ranges);
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
    {
      std::unique_lock<std::mutex> lock(mu_);
      try {
        if (job->kind == JobKind::kMap) {
          run_map(lock, job->ranges, true);
        } else {
          run_unmap(lock, job->ranges, true);
        }
      } catch (...) {
        job->error = std::current_exception();
      }
      for (const auto& r : job->ranges) {  // run_* return and throw with the lock held
        auto it = vtensors_.find(r.vtensor);
        if (it != vtensors_.end()) it->second.pending -= 1;
      }
      counters_.async_jobs += 1;
      counters_.async_pages += job->pages;
    }
    idle_cv_.notify_all();
    {
      std::lock_guard<std::mutex> lock(job->mu);
      job->done = true;
    }
    job->cv.notify_all();
  }
}

}  // namespace glake
