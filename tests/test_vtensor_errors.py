"""Every allocator error: its type and a message that says what was wrong and what to do."""

import pytest

from glakeserve import _vmm
from glakeserve.vtensor import (
    AlreadyMappedError,
    BackendUnavailableError,
    DriverError,
    NotMappedError,
    OutOfRangeError,
    PagePool,
    PoolExhaustedError,
)


def test_pool_exhausted(pool):
    vt = pool.reserve(32 * pool.page_size)
    vt.map(0, 10)
    with pytest.raises(PoolExhaustedError, match=r"needs 10 pages but 6 of 16 pages free .* create a larger pool"):
        vt.map(10, 10)
    assert pool.stats().free_pages == 6  # nothing was taken


def test_map_out_of_range(pool):
    vt = pool.reserve(4 * pool.page_size)
    with pytest.raises(OutOfRangeError, match=r"vTensor \d+ has pages \[0, 4\) .* asked for \[3, 5\)"):
        vt.map(3, 2)
    with pytest.raises(OutOfRangeError, match=r"asked for \[-1, 0\)"):
        vt.map(-1, 1)


def test_double_map(pool):
    vt = pool.reserve(4 * pool.page_size)
    vt.map(1)
    with pytest.raises(AlreadyMappedError, match=r"page 1 of vTensor \d+ is already mapped .* unmap it first"):
        vt.map(0, 2)
    with pytest.raises(AlreadyMappedError, match="appears twice in one map batch"):
        pool.map_batch([(vt, 2, 1), (vt, 2, 1)])


def test_unmap_of_unmapped_page(pool):
    vt = pool.reserve(4 * pool.page_size)
    with pytest.raises(NotMappedError, match=r"page 2 of vTensor \d+ is not mapped; there is nothing to unmap"):
        vt.unmap(2)


def test_alias_of_unmapped_page(pool):
    src = pool.reserve(pool.page_size)
    dst = pool.reserve(pool.page_size)
    with pytest.raises(NotMappedError, match="cannot be aliased; map it first"):
        dst.alias(0, src, 0)


def test_released_vtensor(pool):
    vt = pool.reserve(pool.page_size)
    vt.release()
    with pytest.raises(OutOfRangeError, match=r"vTensor \d+ does not exist \(released, or never reserved\)"):
        vt.map(0)


def test_bad_arguments_are_value_errors(backend):
    with pytest.raises(ValueError, match="not a multiple of"):
        PagePool(1, page_size=3000, backend="host")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        PagePool(1, backend="tpu")
    with pytest.raises(ValueError, match="not both"):
        PagePool(1, nbytes=4096)


def test_host_pool_larger_than_memory_is_refused():
    with pytest.raises(PoolExhaustedError, match="MiB of memory is available. Ask for a smaller pool"):
        PagePool(1 << 40, backend="host")


def test_host_kernel_call_failure_names_the_call_and_errno():
    with PagePool(1, page_size=4096, backend="host") as pool:
        with pytest.raises(DriverError, match=r"host backend: mmap reserve of \d+ bytes failed: ENOMEM"):
            pool.reserve(1 << 62)


@pytest.mark.skipif(_vmm.cuda_available(), reason="this machine has a usable GPU")
def test_cuda_backend_without_libcuda():
    with pytest.raises(BackendUnavailableError, match=r"backend 'cuda' is unavailable: .* or use backend='host'"):
        PagePool(1, backend="cuda")


@pytest.mark.gpu
def test_cuda_driver_failure_names_the_curesult():
    import torch

    free, _ = torch.cuda.mem_get_info()
    pages_too_many = free // (2 << 20) + 64
    with pytest.raises(DriverError, match="cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY"):
        PagePool(pages_too_many, backend="cuda")
    with PagePool(1, backend="cuda") as ok:  # the device is still usable afterwards
        ok.reserve(ok.page_size).map(0)
