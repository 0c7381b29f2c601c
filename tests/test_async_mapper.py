"""The mapping worker: concurrency, per-vTensor ordering, error propagation, wait counting."""

import random
import threading

import pytest
import torch

from glakeserve.vtensor import AlreadyMappedError, NotMappedError, PagePool


def test_many_concurrent_requests(backend):
    page = 4096 if backend == "host" else None
    with PagePool(256, page_size=page, backend=backend) as pool:
        vts = [pool.reserve(32 * pool.page_size, f"vt{i}") for i in range(8)]
        errors = []

        def client(vt):
            try:
                futures = [pool.map_async([(vt, p, 1)]) for p in range(32)]
                for f in futures:
                    f.wait()
            except Exception as e:  # surfaced to the test below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(vt,)) for vt in vts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for vt in vts:
            assert vt.mapped_pages() == list(range(32))
        s = pool.stats()
        assert s.async_jobs == 8 * 32 and s.async_pages == 8 * 32 and s.free_pages == 0
        pool.check_integrity()


def test_jobs_on_one_vtensor_run_in_submission_order(backend):
    page = 4096 if backend == "host" else None
    with PagePool(8, page_size=page, backend=backend) as pool:
        vt = pool.reserve(4 * pool.page_size)
        rng = random.Random()
        expected = set()
        futures = []
        for _ in range(200):  # a random walk of map/unmap that is only valid in order
            p = rng.randrange(4)
            if p in expected:
                futures.append(pool.unmap_async([(vt, p, 1)]))
                expected.discard(p)
            else:
                futures.append(pool.map_async([(vt, p, 1)]))
                expected.add(p)
        futures[-1].wait()
        assert all(f.done() for f in futures)
        for f in futures:
            f.wait()  # none raised: every job found the state its predecessors left
        assert set(vt.mapped_pages()) == expected
        pool.check_integrity()


def test_sync_calls_wait_for_queued_jobs_on_the_same_vtensor():
    with PagePool(512, page_size=4096, backend="host") as pool:
        vt = pool.reserve(512 * 4096)
        for p in range(512):
            pool.map_async([(vt, p, 1)])
        vt.unmap(0, 512)  # valid only after every queued map ran
        assert vt.mapped_pages() == []


def test_errors_surface_on_wait_and_the_worker_goes_on():
    with PagePool(4, page_size=4096, backend="host") as pool:
        vt = pool.reserve(8 * 4096)
        ok = pool.map_async([(vt, 0, 1)])
        bad = pool.map_async([(vt, 0, 1)])  # double map
        missing = pool.unmap_async([(vt, 5, 1)])
        after = pool.map_async([(vt, 1, 1)])
        ok.wait()
        with pytest.raises(AlreadyMappedError, match="page 0 of vTensor .* already mapped"):
            bad.wait()
        with pytest.raises(NotMappedError, match="page 5 .* not mapped"):
            missing.wait()
        after.wait()
        assert vt.mapped_pages() == [0, 1]
        pool.check_integrity()


def test_unknown_vtensor_fails_at_submit():
    with PagePool(1, page_size=4096, backend="host") as pool:
        vt = pool.reserve(4096)
        vt.release()
        with pytest.raises(Exception, match="does not exist"):
            pool.map_async([(vt, 0, 1)])


def test_waiting_on_an_unfinished_job_is_counted():
    with PagePool(16384, page_size=4096, backend="host") as pool:
        vt = pool.reserve(16384 * 4096)
        before = pool.stats().waits  # (stats() takes the lock the worker holds while it maps)
        big = pool.map_async([(vt, p, 1) for p in range(0, 16384, 2)])  # ~8,000 mmap calls
        big.wait()  # called microseconds after submit: the worker is still mapping
        assert pool.stats().waits == before + 1
        big.wait()  # already done: no wait
        assert pool.stats().waits == before + 1


def test_async_mapped_pages_hold_data(backend):
    page = 4096 if backend == "host" else None
    with PagePool(4, page_size=page, backend=backend) as pool:
        vt = pool.reserve(4 * pool.page_size)
        pool.map_async([(vt, 0, 4)]).wait()
        x = torch.randn(4 * pool.page_size // 4, device=pool.device)
        vt.view(torch.float32, x.shape).copy_(x)
        assert torch.equal(vt.view(torch.float32, x.shape), x)


def test_the_worker_never_blocks_other_vtensors_or_stats():
    """The worker makes its driver calls outside the allocator's lock: while it maps a big job,
    a synchronous map of another vTensor, a submit and stats() all complete before it does."""
    with PagePool(16384 + 8, page_size=4096, backend="host") as pool:
        big_vt = pool.reserve(16384 * 4096)
        other = pool.reserve(8 * 4096)
        big = pool.map_async([(big_vt, p, 1) for p in range(0, 16384, 2)])  # ~8,000 mmap calls
        other.map(0, 2)
        small = pool.map_async([(other, 2, 1)])  # queued behind the big job
        pool.stats()
        assert not big.done()
        assert other.mapped_pages() == [0, 1]
        small.wait()
        assert big.done()  # one worker, jobs in order
        pool.check_integrity()
