"""The same page decisions on every rank: rank 0's KV cache decides (its scheduler, books, prefix
index and reclaim policy run once), its pool records every page operation it is asked for, and the
other ranks replay the record on their own pools before they run the step that needs it.

Why replay operations rather than run the KV cache's policy on every rank: the policy reads state
that only rank 0 has (the requests' tokens, the prefix index, which mapping jobs have finished
when it polls), so N copies of it could drift apart; a record of map / unmap / alias / grow /
shrink calls is small, ordered and means the same on every rank because every rank's pool has the
same geometry (the same vTensors, page size and page count: each rank holds as many KV heads).
"""

from __future__ import annotations

import torch

from glakeserve.kv.books import PageBooks
from glakeserve.vtensor import MapFuture, PagePool, VTensor

Op = tuple[str, object]


class JournaledPagePool(PagePool):
    """Rank 0's pool: a PagePool that also records, once recording starts, each page operation with
    its vTensors named by position (rank 0's vTensor ids mean nothing on another rank)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._position: dict[int, int] | None = None  # vTensor id -> position; None: not recording
        self.ops: list[Op] = []
        self.on_shrink = None  # called after a shrink is recorded: memory given back reaches the other ranks now

    def record_from_now(self, vtensors: list[VTensor]) -> None:
        """Records from now on (what happened before, building the cache, every rank did itself)."""
        self._position = {vt.id: i for i, vt in enumerate(vtensors)}

    def take_ops(self) -> list[Op]:
        ops, self.ops = self.ops, []
        return ops

    def _record(self, kind: str, args) -> None:
        if self._position is not None:
            self.ops.append((kind, args))

    def _ranges(self, items) -> list[tuple[int, int, int]]:
        return [(self._position[vt.id], first, count) for vt, first, count in items] if self._position else []

    def _aliases(self, items) -> list[tuple[int, int, int, int, int]]:
        if not self._position:
            return []
        return [(self._position[d.id], df, self._position[s.id], sf, n) for d, df, s, sf, n in items]

    def map_async(self, items) -> MapFuture:
        future = super().map_async(items)
        self._record("map", self._ranges(items))
        return future

    def unmap_async(self, items, after: torch.cuda.Event | None = None) -> MapFuture:
        future = super().unmap_async(items, after=after)
        self._record("unmap", self._ranges(items))
        return future

    def alias_async(self, items) -> MapFuture:
        future = super().alias_async(items)
        self._record("alias", self._aliases(items))
        return future

    def map_batch(self, items) -> None:
        super().map_batch(items)
        self._record("map", self._ranges(items))

    def unmap_batch(self, items) -> None:
        super().unmap_batch(items)
        self._record("unmap", self._ranges(items))

    def alias_batch(self, items) -> None:
        super().alias_batch(items)
        self._record("alias", self._aliases(items))

    def grow(self, pages: int) -> int:
        created = super().grow(pages)
        self._record("grow", created)
        return created

    def shrink(self, pages: int) -> int:
        released = super().shrink(pages)
        if released:
            self._record("shrink", released)
            if self.on_shrink is not None and self._position is not None:
                self.on_shrink()
        return released


class Replayer:
    """Another rank's side: applies rank 0's record to this rank's pool, in order, through the
    pool's mapping worker. wait() returns once every page a kernel may touch is mapped (unmaps are
    not waited for: rank 0 only unmaps pages no later step reads before they are mapped again, and
    the worker runs jobs in order); wait_all() once everything applied is in effect."""

    def __init__(self, pool: PagePool, vtensors: list[VTensor]):
        self.pool, self.vtensors = pool, vtensors
        self.pending: list[MapFuture] = []  # maps and aliases: a step waits for them
        self.unmaps: list[MapFuture] = []  # waited for before the pool's size changes, and checked as they finish

    def apply(self, ops: list[Op], after: torch.cuda.Event | None = None) -> None:
        """after: the event of this rank's last launched step (unmaps wait for its kernels)."""
        vts = self.vtensors
        for kind, args in ops:
            if kind == "map":
                self.pending.append(self.pool.map_async([(vts[i], f, n) for i, f, n in args]))
            elif kind == "unmap":
                self.unmaps.append(self.pool.unmap_async([(vts[i], f, n) for i, f, n in args], after=after))
            elif kind == "alias":
                self.pending.append(self.pool.alias_async([(vts[d], df, vts[s], sf, n) for d, df, s, sf, n in args]))
            elif kind == "grow":
                self.wait_all()
                if self.pool.grow(args) != args:
                    raise RuntimeError(f"could not grow the KV pool by {args} pages as rank 0 did")
            elif kind == "shrink":
                self.wait_all()
                if self.pool.shrink(args) != args:
                    raise RuntimeError(f"could not give back {args} KV pool pages as rank 0 did: this rank's pool "
                                       f"differs from rank 0's")
            else:
                raise ValueError(f"unknown page operation {kind!r}")
        while self.unmaps and self.unmaps[0].done():
            self.unmaps.pop(0).wait()  # raises the job's error

    def wait(self) -> None:
        for future in self.pending:
            future.wait()  # raises the job's error
        self.pending.clear()

    def wait_all(self) -> None:
        self.wait()
        for future in self.unmaps:
            future.wait()
        self.unmaps.clear()

    def check(self, books: dict, blocks_per_slot: int) -> None:
        """Checks this rank's allocator against rank 0's books (its blocks and refcounts): the same
        pages mapped, aliases where rank 0 has them, the same free pages; then the pool's own books."""
        self.wait_all()
        mirror = PageBooks(self.pool, self.vtensors, blocks_per_slot, len(books["blocks"]))
        mirror.blocks = books["blocks"]
        mirror.refs = books["refs"]
        mirror.ready = [len(b) for b in books["blocks"]]
        mirror.total_pages = books["total_pages"]
        mirror.check()
        self.pool.check_integrity()


def books_for_check(books: PageBooks) -> dict:
    """What another rank needs of rank 0's books to check its pool against them."""
    books.drain()
    return {"blocks": [list(b) for b in books.blocks], "refs": dict(books.refs), "total_pages": books.total_pages}
