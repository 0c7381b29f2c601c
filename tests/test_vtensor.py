"""The vTensor layer for real: views, aliasing, remapping, batches, stats, lifetime."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from glakeserve.vtensor import PagePool, VmmError


def fill(vt, page, value):
    ps = vt.pool.page_size
    vt.view(torch.uint8, (ps,), offset=page * ps).fill_(value)


def read(vt, page):
    ps = vt.pool.page_size
    return vt.view(torch.uint8, (ps,), offset=page * ps).cpu()


def test_writes_land_in_pool_pages(pool):
    a = pool.reserve(3 * pool.page_size, "a")
    a.map(0, 3)
    values = torch.randint(1, 255, (3,)).tolist()
    for page, v in enumerate(values):
        fill(a, page, v)
    phys = a.stats().physical_pages
    a.release()
    b = pool.reserve(3 * pool.page_size, "b")
    b.map(0, 3)  # the pool hands out its lowest free pages: the same physical pages again
    assert b.stats().physical_pages == phys
    for page, v in enumerate(values):
        assert bool((read(b, page) == v).all())


def test_alias_shows_writes_through_both_addresses(pool):
    src = pool.reserve(2 * pool.page_size)
    dst = pool.reserve(4 * pool.page_size)
    src.map(0, 2)
    dst.alias(3, src, 1)
    assert dst.address + 3 * pool.page_size != src.address + pool.page_size
    x = torch.randint(0, 255, (pool.page_size,), dtype=torch.uint8, device=pool.device)
    src.view(torch.uint8, (pool.page_size,), offset=pool.page_size).copy_(x)
    assert torch.equal(read(dst, 3), x.cpu())
    fill(dst, 3, 42)  # and back the other way
    assert bool((read(src, 1) == 42).all())
    st = dst.stats()
    assert st.mapped_pages == [3] and st.physical_pages == [src.stats().physical_pages[1]]
    assert st.shared_pages == 1 and pool.stats().shared_pages == 1
    pool.check_integrity()


def test_remap_to_another_page_shows_that_pages_bytes(pool):
    holder = pool.reserve(2 * pool.page_size)
    holder.map(0, 2)
    fill(holder, 0, 11)
    fill(holder, 1, 22)
    window = pool.reserve(pool.page_size)
    window.alias(0, holder, 0)
    assert bool((read(window, 0) == 11).all())
    window.unmap(0)
    window.alias(0, holder, 1)
    assert bool((read(window, 0) == 22).all())
    pool.check_integrity()


def test_unmapped_page_goes_back_to_the_pool_only_when_no_alias_remains(pool):
    a = pool.reserve(pool.page_size)
    b = pool.reserve(pool.page_size)
    a.map(0)
    b.alias(0, a, 0)
    free = pool.stats().free_pages
    a.unmap(0)
    assert pool.stats().free_pages == free  # b still maps it
    b.unmap(0)
    assert pool.stats().free_pages == free + 1
    pool.check_integrity()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_views_of_any_shape_dtype_and_strides(pool, dtype):
    vt = pool.reserve(4 * pool.page_size)
    vt.map(0, 4)
    n = 4 * pool.page_size // dtype.itemsize
    flat = vt.view(dtype, (n,))
    flat.copy_(torch.arange(n, device=pool.device).to(dtype))
    # a strided 3-D view, e.g. [slots, tokens, dim] read with a transposed layout
    view = vt.view(dtype, (3, 5, 7), strides=(70, 1, 10), offset=16 * dtype.itemsize)
    expect = torch.as_strided(flat, (3, 5, 7), (70, 1, 10), 16)
    assert torch.equal(view, expect)
    assert view.data_ptr() == vt.address + 16 * dtype.itemsize  # zero copy: same address
    assert view.device.type == pool.device.type


def test_view_bounds_are_checked(pool):
    vt = pool.reserve(pool.page_size)
    with pytest.raises(ValueError, match="needs .* bytes"):
        vt.view(torch.float32, (pool.page_size,))
    with pytest.raises(ValueError, match="multiple of"):
        vt.view(torch.float32, (4,), offset=2)


def test_batched_map_merges_adjacent_ranges_into_one_set_access(pool):
    a = pool.reserve(8 * pool.page_size)
    b = pool.reserve(8 * pool.page_size)
    before = pool.stats().set_access_calls
    pool.map_batch([(a, 0, 2), (a, 2, 3), (b, 4, 1), (a, 6, 1)])
    # a[0:5] is one run; b[4] and a[6] are runs of their own
    assert pool.stats().set_access_calls - before == 3
    assert a.mapped_pages() == [0, 1, 2, 3, 4, 6]
    assert b.mapped_pages() == [4]
    pool.unmap_batch([(a, 0, 5), (b, 4, 1)])
    assert a.mapped_pages() == [6]
    pool.check_integrity()


def test_a_failing_batch_changes_nothing(pool):
    a = pool.reserve(4 * pool.page_size)
    a.map(2)
    before = pool.stats()
    with pytest.raises(VmmError):
        pool.map_batch([(a, 0, 2), (a, 2, 1)])  # the second range is already mapped
    after = pool.stats()
    assert (after.free_pages, after.mappings) == (before.free_pages, before.mappings)
    assert a.mapped_pages() == [2]


def test_is_mapped(pool):
    vt = pool.reserve(4 * pool.page_size)
    vt.map(1, 2)
    ps = pool.page_size
    assert vt.is_mapped(ps, 3 * ps)
    assert not vt.is_mapped(ps - 1, 2 * ps)
    assert not vt.is_mapped(2 * ps, 3 * ps + 1)


def test_grow_and_shrink_never_take_mapped_pages(pool):
    vt = pool.reserve(4 * pool.page_size)
    vt.map(0, 4)
    total = pool.stats().total_pages
    released = pool.shrink(1000)
    s = pool.stats()
    assert released == total - 4 and s.total_pages == 4 and s.free_pages == 0
    fill(vt, 3, 9)
    assert bool((read(vt, 3) == 9).all())
    assert pool.grow(3) == 3
    assert pool.stats().total_pages == 7
    vt.unmap(0, 4)
    pool.check_integrity()


def test_stats_track_reservations_and_mappings(pool):
    a = pool.reserve(3 * pool.page_size + 1)  # rounds up to 4 pages
    assert a.nbytes == 4 * pool.page_size and a.num_pages == 4
    a.map(1, 2)
    s = pool.stats()
    assert s.num_vtensors == 1 and s.reserved_bytes == 4 * pool.page_size
    assert s.used_pages == 2 and s.mappings == 2 and s.free_pages == s.total_pages - 2
    snap = pool.snapshot()
    assert snap["vtensors"][0]["mapped_pages"] == [1, 2]


def test_close_releases_everything(backend):
    pool = PagePool(4, page_size=4096 if backend == "host" else None, backend=backend)
    vt = pool.reserve(2 * pool.page_size)
    vt.map(0, 2)
    pool.close()
    with pytest.raises(VmmError, match="closed"):
        pool.reserve(pool.page_size)
    with pytest.raises(VmmError, match="released"):
        vt.view(torch.uint8, (4,))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc")
def test_host_mappings_are_real_memfd_pages():
    with PagePool(4, page_size=4096, backend="host") as pool:
        vt = pool.reserve(2 * 4096)
        vt.map(1)
        phys = vt.stats().physical_pages[0]
        start = vt.address + 4096
        lines = [ln for ln in open("/proc/self/maps") if int(ln.split("-")[0], 16) == start]
        assert lines and "glake-page-pool" in lines[0], lines
        assert int(lines[0].split()[2], 16) == phys * 4096  # file offset = pool page * page size


def test_process_exit_leaks_nothing():
    """A process that never closes its pool still ends with no pool mapping and no memfd open."""
    script = textwrap.dedent(
        """
        import atexit, os
        def check():  # registered first, so it runs after glakeserve's own exit hook
            maps = open("/proc/self/maps").read()
            fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                   if os.path.exists(f"/proc/self/fd/{fd}")]
            print("LEAK" if "glake-page-pool" in maps or any("glake-page-pool" in f for f in fds) else "CLEAN")
        atexit.register(check)
        from glakeserve.vtensor import PagePool
        pool = PagePool(8, page_size=4096, backend="host")
        vt = pool.reserve(4 * 4096)
        vt.map(0, 4)
        view = vt.view(__import__("torch").uint8, (4096,))
        view.fill_(1)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("CLEAN"), out.stdout + out.stderr
