"""Python face of the allocator extension: PagePool, VTensor, and zero-copy torch views.

A PagePool owns physical pages (created when it grows, never on the mapping path). A VTensor is a reserved, contiguous
virtual range whose pages are mapped from the pool on demand; `VTensor.view()` returns a torch
tensor of any shape, dtype and strides over that range without copying. Policy (which request gets
which pages) lives above this module, in glakeserve/kv/.
"""

from __future__ import annotations

import atexit
import math
import weakref
from dataclasses import dataclass, field

import torch

from glakeserve import _vmm
from glakeserve._vmm import (  # noqa: F401  (re-exported for callers)
    AlreadyMappedError,
    BackendUnavailableError,
    DriverError,
    MapFuture,
    NotMappedError,
    OutOfRangeError,
    PoolExhaustedError,
    VmmError,
)

DEFAULT_PAGE_SIZE = 2 << 20
_live_pools: weakref.WeakSet[PagePool] = weakref.WeakSet()


@dataclass(frozen=True)
class PoolStats:
    backend: str
    device: int
    page_size: int
    total_pages: int  # physical pages that exist now
    free_pages: int
    used_pages: int  # pages at least one vTensor maps
    shared_pages: int  # pages mapped more than once (aliases)
    mappings: int  # backed virtual pages over all vTensors (aliases count each time)
    num_vtensors: int
    reserved_bytes: int
    pages_mapped: int  # running counters since start-up from here on
    pages_unmapped: int
    pages_aliased: int
    set_access_calls: int
    pages_created: int
    pages_released: int
    sync_driver_calls: int  # driver calls a caller waited for (synchronous API), not the worker's jobs
    async_jobs: int
    async_pages: int
    waits: int  # times a caller blocked on the mapping worker
    wait_seconds: float
    map_seconds: float  # time inside the backend's map / set-access / unmap calls
    set_access_seconds: float
    unmap_seconds: float


@dataclass(frozen=True)
class VTensorStats:
    id: int
    name: str
    address: int
    reserved_bytes: int
    num_pages: int
    mapped_pages: list[int] = field(default_factory=list)  # virtual page indices
    physical_pages: list[int] = field(default_factory=list)  # pool page behind each
    shared_pages: int = 0
    pending_jobs: int = 0


class PagePool:
    """Physical pages plus the vTensors mapped from them.

    Size the pool with `num_pages` or `nbytes` (rounded down to whole pages). `backend` is "auto"
    (cuda when a GPU is usable, else host), "cuda" or "host"; `page_size` defaults to the driver's
    granularity on cuda and 2 MiB on host.
    """

    def __init__(
        self,
        num_pages: int | None = None,
        *,
        nbytes: int | None = None,
        page_size: int | None = None,
        backend: str = "auto",
        device: int = 0,
    ):
        if num_pages is not None and nbytes is not None:
            raise ValueError("give the pool size as num_pages or as nbytes, not both")
        if num_pages is not None and num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if page_size is not None and page_size <= 0:
            raise ValueError(f"page_size must be > 0, got {page_size}")
        self._alloc = _vmm.Allocator(backend, device, page_size or 0, 0)
        self._vtensors: dict[int, VTensor] = {}
        pages = num_pages if num_pages is not None else (nbytes or 0) // self.page_size
        if pages:
            try:
                self._alloc.grow(pages)
            except BaseException:
                self._alloc.close()
                raise
        _live_pools.add(self)

    # ----- properties -------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._alloc.backend

    @property
    def page_size(self) -> int:
        return self._alloc.page_size

    @property
    def device(self) -> torch.device:
        if self._alloc.dlpack_device_type == 2:
            return torch.device("cuda", self._alloc.device_id)
        return torch.device("cpu")

    @property
    def closed(self) -> bool:
        return self._alloc.closed

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of the device (cuda) or of the machine (host)."""
        return self._alloc.memory_info()

    # ----- vTensors ---------------------------------------------------------------------------
    def reserve(self, nbytes: int, name: str = "") -> VTensor:
        """Reserves `nbytes` (rounded up to whole pages) of contiguous virtual space; maps nothing."""
        if nbytes <= 0:
            raise ValueError(f"a vTensor needs a positive size in bytes, got {nbytes}")
        vid = self._alloc.reserve(nbytes)
        vt = VTensor(self, vid, name or f"vtensor-{vid}")
        self._vtensors[vid] = vt
        return vt

    def vtensors(self) -> list[VTensor]:
        return list(self._vtensors.values())

    # ----- batched operations -----------------------------------------------------------------
    def map_batch(self, items: list[tuple[VTensor, int, int]]) -> None:
        """Maps fresh pages at each (vtensor, first_page, count): all of them, or none on error.
        Adjacent ranges share one set-access call."""
        self._alloc.map([(vt.id, first, count) for vt, first, count in items])

    def unmap_batch(self, items: list[tuple[VTensor, int, int]]) -> None:
        self._alloc.unmap([(vt.id, first, count) for vt, first, count in items])

    def alias_batch(self, items: list[tuple[VTensor, int, VTensor, int, int]]) -> None:
        """Each item (dst, dst_first, src, src_first, count) maps src's physical pages at dst too."""
        self._alloc.alias([(d.id, df, s.id, sf, n) for d, df, s, sf, n in items])

    def map_async(self, items: list[tuple[VTensor, int, int]]) -> MapFuture:
        """Queues a map job on the worker thread; returns a future to poll (`done()`) or `wait()` on.
        Jobs run in submission order; synchronous calls on a vTensor wait for its queued jobs."""
        return self._alloc.submit("map", [(vt.id, first, count) for vt, first, count in items])

    def unmap_async(self, items: list[tuple[VTensor, int, int]], after: torch.cuda.Event | None = None) -> MapFuture:
        """Queues an unmap job. `after`: a recorded CUDA event the worker waits for first, so kernels
        queued before it finish reading these pages."""
        return self._alloc.submit("unmap", [(vt.id, first, count) for vt, first, count in items],
                                  after_event=_event_handle(after))

    def alias_async(self, items: list[tuple[VTensor, int, VTensor, int, int]]) -> MapFuture:
        """Queues an alias job: each item (dst, dst_first, src, src_first, count), as alias_batch."""
        return self._alloc.submit("alias", aliases=[(d.id, df, s.id, sf, n) for d, df, s, sf, n in items])

    # ----- elasticity -------------------------------------------------------------------------
    def grow(self, pages: int) -> int:
        """Creates `pages` more physical pages; returns how many were created."""
        return self._alloc.grow(pages)

    def shrink(self, pages: int) -> int:
        """Releases up to `pages` free physical pages back to the driver; never a mapped one."""
        return self._alloc.shrink(pages)

    # ----- statistics -------------------------------------------------------------------------
    def stats(self) -> PoolStats:
        return PoolStats(**self._alloc.stats())

    def free_pages(self) -> int:
        """Free physical pages now (cheaper than stats())."""
        return self._alloc.free_pages()

    def page_refcounts(self) -> list[int | None]:
        """Mappings per pool page id; None where the physical page does not exist now."""
        return self._alloc.page_refcounts()

    def snapshot(self) -> dict:
        """Everything `glake inspect-memory` shows, as plain data, read consistently (one lock)."""
        stats, infos, refcounts = self._alloc.snapshot()
        names = {vid: vt.name for vid, vt in self._vtensors.items()}
        return {
            "pool": stats,
            "vtensors": [VTensorStats(name=names.get(i["id"], f"vtensor-{i['id']}"), **i).__dict__ for i in infos],
            "refcounts": refcounts,
        }

    def check_integrity(self) -> None:
        """Raises AssertionError unless the pool's books balance: free + used == total, and each
        page's mapping count equals the number of vTensor pages that map it."""
        snap = self.snapshot()
        s, refs = snap["pool"], snap["refcounts"]
        assert s["free_pages"] + s["used_pages"] == s["total_pages"], s
        counted: dict[int, int] = {}
        for vt in snap["vtensors"]:
            for page in vt["physical_pages"]:
                counted[page] = counted.get(page, 0) + 1
        for page, ref in enumerate(refs):
            if ref is None:
                assert page not in counted, f"pool page {page} is mapped but does not exist"
            else:
                assert ref == counted.get(page, 0), f"pool page {page}: refcount {ref}, mapped {counted.get(page, 0)}"
        assert s["free_pages"] == sum(1 for r in refs if r == 0), s
        assert s["mappings"] == sum(counted.values()), s
        assert s["shared_pages"] == sum(1 for n in counted.values() if n > 1), s

    # ----- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Unmaps everything and releases every physical page. Views made earlier become invalid."""
        for vt in self._vtensors.values():
            vt._released = True
        self._vtensors.clear()
        self._alloc.close()

    def __enter__(self) -> PagePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"PagePool(backend={s.backend!r}, page_size={s.page_size}, pages={s.used_pages}/{s.total_pages} used, "
            f"vtensors={s.num_vtensors})"
        )


class VTensor:
    """A contiguous virtual range whose pages are mapped on demand. Get one from PagePool.reserve."""

    def __init__(self, pool: PagePool, vid: int, name: str):
        self.pool = pool
        self.id = vid
        self.name = name
        info = pool._alloc.info(vid)
        self.nbytes: int = info["reserved_bytes"]
        self.num_pages: int = info["num_pages"]
        self.address: int = info["address"]
        self._released = False
        self._bytes: torch.Tensor | None = None  # the whole range as uint8, made on first view

    def map(self, first: int, count: int = 1) -> None:
        self.pool._alloc.map([(self.id, first, count)])

    def unmap(self, first: int, count: int = 1) -> None:
        self.pool._alloc.unmap([(self.id, first, count)])

    def map_async(self, first: int, count: int = 1) -> MapFuture:
        return self.pool._alloc.submit("map", [(self.id, first, count)])

    def alias(self, first: int, src: VTensor, src_first: int, count: int = 1) -> None:
        """Maps src's physical pages [src_first, src_first + count) at this vTensor's pages
        [first, first + count): both ranges then show the same bytes."""
        self.pool._alloc.alias([(self.id, first, src.id, src_first, count)])

    def stats(self) -> VTensorStats:
        return VTensorStats(name=self.name, **self.pool._alloc.info(self.id))

    def mapped_pages(self) -> list[int]:
        return self.stats().mapped_pages

    def is_mapped(self, byte_start: int, byte_end: int) -> bool:
        """Whether every page that bytes [byte_start, byte_end) touch is mapped. Check before a kernel
        reads there: touching an unmapped page is a segfault on host, an illegal address on a GPU."""
        if byte_end <= byte_start:
            return True
        first = byte_start // self.pool.page_size
        last = (byte_end - 1) // self.pool.page_size
        mapped = set(self.mapped_pages())
        return all(p in mapped for p in range(first, last + 1))

    def view(
        self,
        dtype: torch.dtype,
        shape: tuple[int, ...] | list[int],
        strides: tuple[int, ...] | list[int] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """A tensor over this range, zero copy: `shape` and `strides` (in elements, default
        contiguous) starting `offset` bytes in. Only mapped pages may be read or written."""
        if self._released:
            raise VmmError(f"{self.name} was released; reserve a new vTensor")
        shape = tuple(int(s) for s in shape)
        itemsize = dtype.itemsize
        if strides is None:
            strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        strides = tuple(int(s) for s in strides)
        if len(strides) != len(shape):
            raise ValueError(f"shape {shape} and strides {strides} differ in length")
        if any(s < 0 for s in shape) or any(s < 0 for s in strides):
            raise ValueError(f"negative sizes or strides are not supported: shape {shape}, strides {strides}")
        if offset < 0 or offset % itemsize:
            raise ValueError(f"offset {offset} must be a non-negative multiple of {dtype}'s size {itemsize}")
        extent = 0 if 0 in shape else (sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * itemsize
        if offset + extent > self.nbytes:
            raise ValueError(
                f"a view of shape {shape}, strides {strides} at offset {offset} needs {offset + extent} bytes; "
                f"{self.name} reserves {self.nbytes}"
            )
        if self._bytes is None:
            self._bytes = torch.from_dlpack(self.pool._alloc.dlpack(self.id))
        return torch.as_strided(self._bytes.view(dtype), shape, strides, offset // itemsize)

    def release(self) -> None:
        """Unmaps every page (returning unshared ones to the pool) and forgets the vTensor."""
        if self._released:
            return
        self.pool._alloc.release(self.id)
        self.pool._vtensors.pop(self.id, None)
        self._released = True
        self._bytes = None

    def __repr__(self) -> str:
        return f"VTensor({self.name!r}, {self.nbytes} bytes, {self.num_pages} pages)"


def _event_handle(event: torch.cuda.Event | None) -> int:
    """The driver's handle of a torch CUDA event (0: none, or never recorded)."""
    return 0 if event is None else int(event.cuda_event)


def cuda_available() -> bool:
    return _vmm.cuda_available()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_live_pools):
        if not pool.closed:
            pool.close()
