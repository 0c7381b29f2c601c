"""The allocator's page tables as they will be once the mapping worker has run every queued job,
kept in Python ahead of the worker. The vTensor cache decides against these books and queues the
driver work as jobs: the engine's thread makes no driver call in steady state.

The worker runs jobs in submission order, so the books can count a page as used from the moment its
map is queued and as free from the moment its unmap is queued: a map queued later finds it free.
Only a kernel's reads need the real state, and `wait_ready` waits for exactly the jobs that map the
blocks a step touches. Unmaps wait on the device for the last step launched before them (a CUDA
event the worker synchronizes on), so no page leaves while a queued kernel may still read it.

A block is one page in every vTensor of a slot; the books name each block's physical pages by a
logical id (one id per physical page group). Two blocks with the same id are aliases.
"""

from __future__ import annotations

from collections import deque

import torch

from glakeserve.vtensor import MapFuture, PagePool, VTensor


class PageBooks:
    def __init__(self, pool: PagePool, vtensors: list[VTensor], blocks_per_slot: int, num_slots: int):
        self.pool = pool
        self.vtensors = vtensors
        self.pages_per_block = len(vtensors)
        self.blocks_per_slot = blocks_per_slot
        self.blocks: list[list[int]] = [[] for _ in range(num_slots)]  # logical id per block: a prefix of the slot
        self.refs: dict[int, int] = {}  # logical id -> blocks that map it
        # blocks at the front of each slot the allocator has mapped now, with no queued unmap touching them
        self.ready = [0] * num_slots
        self.pending: list[deque[tuple[int, MapFuture]]] = [deque() for _ in range(num_slots)]  # (ready after, job)
        self._busy: set[int] = set()  # slots with pending jobs
        self._events: deque[tuple[MapFuture, torch.cuda.Event]] = deque()  # kept alive until their job ran
        self.total_pages = pool.stats().total_pages
        self._next_id = 1
        self.waits = 0

    # ----- reading ----------------------------------------------------------------------------
    def free_pages(self) -> int:
        return self.total_pages - self.pages_per_block * len(self.refs)

    def pages_freed_by(self, slot: int, first: int = 0) -> int:
        """Pool pages unmapping the slot's blocks from `first` on would free (shared ones stay)."""
        return self.pages_per_block * sum(1 for lid in self.blocks[slot][first:] if self.refs[lid] == 1)

    def first_shared(self, slot: int, start: int) -> int | None:
        blocks = self.blocks[slot]
        return next((b for b in range(start, len(blocks)) if self.refs[blocks[b]] > 1), None)

    def shared_blocks(self, slot: int) -> int:
        return sum(1 for lid in self.blocks[slot] if self.refs[lid] > 1)

    # ----- queueing ---------------------------------------------------------------------------
    def _ranges(self, slot: int, start: int, stop: int) -> list[tuple[VTensor, int, int]]:
        base = slot * self.blocks_per_slot
        return [(vt, base + start, stop - start) for vt in self.vtensors]

    def _unref(self, lid: int) -> None:
        self.refs[lid] -= 1
        if not self.refs[lid]:
            del self.refs[lid]

    def _cap(self, slot: int, first: int) -> None:
        """Blocks from `first` on are about to be unmapped: none of them counts as ready any more."""
        self.ready[slot] = min(self.ready[slot], first)
        self.pending[slot] = deque((min(r, first), f) for r, f in self.pending[slot])

    def _track(self, future: MapFuture, slots: list[int], event: torch.cuda.Event | None = None,
               ready_after: int | None = None) -> None:
        """The job brings each slot's blocks up to ready_after (default: all the books hold now)."""
        for slot in slots:
            self.pending[slot].append((len(self.blocks[slot]) if ready_after is None else ready_after, future))
            self._busy.add(slot)
        if event is not None:
            self._events.append((future, event))

    def map(self, wanted: list[tuple[int, int]]) -> None:
        """Queues one job that maps fresh pages so that each (slot, blocks) has that many blocks."""
        ranges, slots = [], []
        for slot, stop in wanted:
            blocks = self.blocks[slot]
            start = len(blocks)
            if stop <= start:
                continue
            for _ in range(start, stop):
                self.refs[self._next_id] = 1
                blocks.append(self._next_id)
                self._next_id += 1
            ranges += self._ranges(slot, start, stop)
            slots.append(slot)
        if ranges:
            self._track(self.pool.map_async(ranges), slots)

    def truncate(self, slot: int, first: int, after: torch.cuda.Event | None) -> None:
        """Queues an unmap of the slot's blocks from `first` on, run once `after` has completed."""
        blocks = self.blocks[slot]
        if first >= len(blocks):
            return
        ranges = self._ranges(slot, first, len(blocks))
        for lid in blocks[first:]:
            self._unref(lid)
        del blocks[first:]
        self._cap(slot, first)
        self._track(self.pool.unmap_async(ranges, after=after), [slot], after)

    def alias_front(self, slot: int, sources: list[int], after: torch.cuda.Event | None) -> None:
        """Makes the slot's blocks [0, k) aliases of other slots' blocks at the same offsets
        (sources[b]: the slot whose block b to share). What the slot mapped there goes first."""
        blocks = self.blocks[slot]
        k = len(sources)
        n = min(k, len(blocks))
        if n:
            ranges = self._ranges(slot, 0, n)
            for lid in blocks[:n]:
                self._unref(lid)
            self._cap(slot, 0)
            # after this unmap no block of the slot is ready (the list still holds the old ids here);
            # the alias job below brings them back
            self._track(self.pool.unmap_async(ranges, after=after), [slot], after, ready_after=0)
        items = []
        base = slot * self.blocks_per_slot
        b = 0
        while b < k:  # one alias range per run of blocks shared from the same slot
            src, run = sources[b], 1
            while b + run < k and sources[b + run] == src:
                run += 1
            src_base = src * self.blocks_per_slot
            items += [(vt, base + b, vt, src_base + b, run) for vt in self.vtensors]
            for i in range(b, b + run):
                lid = self.blocks[src][i]
                self.refs[lid] += 1
                if i < len(blocks):
                    blocks[i] = lid
                else:
                    blocks.append(lid)
            b += run
        self._track(self.pool.alias_async(items), [slot])

    # ----- the real state ---------------------------------------------------------------------
    def wait_ready(self, slot: int, blocks: int) -> None:
        """Returns once the allocator has mapped the slot's first `blocks` blocks."""
        pending = self.pending[slot]
        while self.ready[slot] < blocks:
            ready_after, future = pending.popleft()  # the books promise them, so a job brings them
            if not future.done():
                self.waits += 1
            future.wait()  # raises the job's error, if any
            self.ready[slot] = ready_after
        if not pending:
            self._busy.discard(slot)

    def poll(self) -> None:
        """Takes note of finished jobs without waiting; drops events their jobs no longer need."""
        for slot in list(self._busy):
            pending = self.pending[slot]
            while pending and pending[0][1].done():
                ready_after, future = pending.popleft()
                future.wait()
                self.ready[slot] = ready_after
            if not pending:
                self._busy.discard(slot)
        while self._events and self._events[0][0].done():
            self._events.popleft()

    def drain(self) -> None:
        """Waits for every queued job: afterwards the allocator's state is the books'."""
        for slot in list(self._busy):
            self.wait_ready(slot, len(self.blocks[slot]))
            for _, future in self.pending[slot]:
                future.wait()
            self.pending[slot].clear()
            self.ready[slot] = len(self.blocks[slot])
        self._busy.clear()
        self._events.clear()

    # ----- the pool's size --------------------------------------------------------------------
    def grow(self, pages: int) -> None:
        """Creates physical pages now (the driver call is on the caller's thread: growth is rare)."""
        self.pool.grow(pages)
        self.total_pages += pages

    def shrink(self, pages: int) -> int:
        self.drain()
        released = self.pool.shrink(pages)
        self.total_pages -= released
        return released

    # ----- integrity --------------------------------------------------------------------------
    def check(self) -> None:
        """Drains, then compares the books with the allocator: the same pages mapped, aliases
        exactly where the books have one id twice, refcounts and free pages equal."""
        self.drain()
        snap = self.pool.snapshot()
        assert snap["pool"]["total_pages"] == self.total_pages, (snap["pool"]["total_pages"], self.total_pages)
        assert snap["pool"]["free_pages"] == self.free_pages(), (snap["pool"]["free_pages"], self.free_pages())
        infos = {v["id"]: dict(zip(v["mapped_pages"], v["physical_pages"])) for v in snap["vtensors"]}
        physical_of: dict[int, tuple[int, ...]] = {}
        seen_pages: dict[int, int] = {}
        for slot, blocks in enumerate(self.blocks):
            assert self.ready[slot] == len(blocks), (slot, self.ready[slot], len(blocks))
            base = slot * self.blocks_per_slot
            for b, lid in enumerate(blocks):
                phys = tuple(infos[vt.id].get(base + b) for vt in self.vtensors)
                assert None not in phys, f"slot {slot} block {b}: the books map it, the allocator does not"
                assert physical_of.setdefault(lid, phys) == phys, f"slot {slot} block {b}: alias of other pages"
                for p in phys:
                    assert seen_pages.setdefault(p, lid) == lid, f"pool page {p} behind two different blocks"
        for vt in self.vtensors:
            mapped = set(infos[vt.id])
            booked = {slot * self.blocks_per_slot + b for slot, blocks in enumerate(self.blocks) for b in range(len(blocks))}
            assert mapped == booked, (vt.name, sorted(mapped ^ booked)[:8])
        refcounts = snap["refcounts"]
        for lid, phys in physical_of.items():
            for p in phys:
                assert refcounts[p] == self.refs[lid], (lid, p, refcounts[p], self.refs[lid])
