"""Costs of the vTensor mechanism: map, set-access, unmap per page, batched against one by one; the
async worker's throughput; and a copy through a view over mapped VMM memory against the same copy on
ordinary `torch.empty` memory, in the same run.

    python benchmarks/vmm_ops.py [--backend auto|cuda|host] [--gib 1] [--json out.json]

Per-call costs come from the allocator's own timers (time spent inside the driver calls), the
end-to-end per-page figures from wall-clock time around the Python calls.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glakeserve.vtensor import PagePool
from report import save_json


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def map_costs(pool: PagePool, pages: int) -> dict:
    vt = pool.reserve(pages * pool.page_size, "bench")
    out = {}
    # one by one: every page its own map + set-access
    s0 = pool.stats()
    wall = timed(lambda: [vt.map(p) for p in range(pages)])
    s1 = pool.stats()
    out["one_by_one_map_us_per_page"] = 1e6 * wall / pages
    out["driver_map_us"] = 1e6 * (s1.map_seconds - s0.map_seconds) / pages
    out["driver_set_access_us"] = 1e6 * (s1.set_access_seconds - s0.set_access_seconds) / pages
    wall = timed(lambda: [vt.unmap(p) for p in range(pages)])
    s2 = pool.stats()
    out["one_by_one_unmap_us_per_page"] = 1e6 * wall / pages
    out["driver_unmap_us"] = 1e6 * (s2.unmap_seconds - s1.unmap_seconds) / pages
    # batched: all pages in one call, one set-access over the whole range
    wall = timed(lambda: vt.map(0, pages))
    s3 = pool.stats()
    out["batched_map_us_per_page"] = 1e6 * wall / pages
    out["batched_set_access_calls"] = s3.set_access_calls - s2.set_access_calls
    out["batched_set_access_us_total"] = 1e6 * (s3.set_access_seconds - s2.set_access_seconds)
    wall = timed(lambda: vt.unmap(0, pages))
    out["batched_unmap_us_per_page"] = 1e6 * wall / pages
    out["batched_speedup"] = out["one_by_one_map_us_per_page"] / out["batched_map_us_per_page"]
    vt.release()
    return out


def page_size_sweep(backend: str, nbytes: int, sizes_mib: list[int]) -> dict:
    """Batched map + one set-access of the whole range, and batched unmap, for several page sizes:
    the driver's set-access cost grows with the number of physical allocations it covers."""
    out = {}
    for mib in sizes_mib:
        page_size = mib << 20
        pages = nbytes // page_size
        with PagePool(pages, page_size=page_size, backend=backend) as pool:
            vt = pool.reserve(nbytes)
            vt.map(0, pages)  # warm-up
            vt.unmap(0, pages)
            s0 = pool.stats()
            wall_map = timed(lambda: vt.map(0, pages))
            s1 = pool.stats()
            wall_unmap = timed(lambda: vt.unmap(0, pages))
            out[f"sweep_{mib}MiB"] = {
                "pages": pages,
                "map_us_total": 1e6 * wall_map,
                "set_access_us_total": 1e6 * (s1.set_access_seconds - s0.set_access_seconds),
                "unmap_us_total": 1e6 * wall_unmap,
            }
    return out


def async_throughput(pool: PagePool, pages: int, pages_per_job: int) -> dict:
    vts = [pool.reserve(pages_per_job * pool.page_size) for _ in range(pages // pages_per_job)]
    t0 = time.perf_counter()
    futures = [pool.map_async([(vt, 0, pages_per_job)]) for vt in vts]
    submit = time.perf_counter() - t0
    for f in futures:
        f.wait()
    total = time.perf_counter() - t0
    for vt in vts:
        vt.release()
    return {
        "async_pages_per_s": pages / total,
        "async_pages_per_job": pages_per_job,
        "async_submit_us_per_job": 1e6 * submit / len(vts),
    }


def copy_bandwidth(pool: PagePool, nbytes: int, iters: int) -> dict:
    """dst.copy_(src) of nbytes, both buffers on VMM views vs both on torch.empty; GB/s counts read + write."""
    pages = nbytes // pool.page_size
    a, b = pool.reserve(nbytes, "copy-src"), pool.reserve(nbytes, "copy-dst")
    pool.map_batch([(a, 0, pages), (b, 0, pages)])
    n = nbytes // 2
    vmm_src, vmm_dst = a.view(torch.bfloat16, (n,)), b.view(torch.bfloat16, (n,))
    vmm_src.normal_()
    plain_src = torch.empty(n, dtype=torch.bfloat16, device=pool.device).normal_()
    plain_dst = torch.empty_like(plain_src)
    cuda = pool.device.type == "cuda"

    def measure(dst, src) -> float:
        for _ in range(3):
            dst.copy_(src)
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / iters
        else:
            seconds = timed(lambda: [dst.copy_(src) for _ in range(iters)]) / iters
        return 2 * nbytes / seconds / 1e9

    # interleave the two, so drift in clocks hits both alike
    vmm, plain = [], []
    for _ in range(3):
        vmm.append(measure(vmm_dst, vmm_src))
        plain.append(measure(plain_dst, plain_src))
    assert torch.equal(vmm_dst, vmm_src)
    a.release()
    b.release()
    best_vmm, best_plain = max(vmm), max(plain)
    return {
        "copy_bytes": nbytes,
        "copy_vmm_GBps": best_vmm,
        "copy_plain_GBps": best_plain,
        "copy_vmm_over_plain": best_vmm / best_plain,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--gib", type=float, default=1.0, help="size of the mapped range and of each copy buffer")
    ap.add_argument("--page-sizes", default="2,8,32", help="MiB page sizes for the set-access sweep")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    nbytes = int(args.gib * (1 << 30))
    probe = PagePool(0, backend=args.backend)
    page_size, device = probe.page_size, probe.device
    probe.close()
    pages = nbytes // page_size
    with PagePool(2 * pages + 8, backend=args.backend) as pool:
        result = {"backend": pool.backend, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "page_size": page_size, "pages": pages}
        map_costs(pool, 8)  # warm-up
        result.update(map_costs(pool, pages))
        result.update(async_throughput(pool, pages, pages_per_job=8))
        result.update(copy_bandwidth(pool, nbytes, iters=20 if device.type == "cuda" else 3))
    sizes = [m for m in map(int, args.page_sizes.split(",")) if (m << 20) % page_size == 0]
    result.update(page_size_sweep(args.backend, nbytes, sizes))
    print(json.dumps(result, indent=2))
    save_json(result, args.json)


if __name__ == "__main__":
    main()
