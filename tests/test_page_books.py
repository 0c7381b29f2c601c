"""PageBooks (glakeserve/kv/books.py) against a model of the mapping worker that runs its queued
jobs only when someone waits: whatever order and timing the worker takes, `wait_ready(slot, n)`
must return only once the allocator really maps the slot's first n blocks, with the pages the books
name (an alias shows its source's pages). Fresh random operations every run."""

import random
from types import SimpleNamespace

from glakeserve.kv.books import PageBooks


class LazyWorker:
    """The allocator: a page table per vTensor, changed by jobs that run in submission order, but
    only when a future is waited on (everything up to it) or when the test lets some run."""

    def __init__(self, pages: int):
        self.table: dict[tuple[int, int], int] = {}  # (vtensor id, virtual page) -> physical page
        self.free = list(range(pages))
        self.queue: list = []

    # the PagePool calls PageBooks makes
    def stats(self):
        return SimpleNamespace(total_pages=len(self.free))

    def map_async(self, ranges):
        return self._submit(lambda: [self._map(vt.id, p) for vt, first, n in ranges for p in range(first, first + n)])

    def unmap_async(self, ranges, after=None):
        return self._submit(lambda: [self._unmap(vt.id, p) for vt, first, n in ranges for p in range(first, first + n)])

    def alias_async(self, items):
        def run():
            for dst, dst_first, src, src_first, n in items:
                for i in range(n):
                    assert (dst.id, dst_first + i) not in self.table, "alias over a mapped page"
                    self.table[(dst.id, dst_first + i)] = self.table[(src.id, src_first + i)]
        return self._submit(run)

    def _map(self, vt, page):
        assert (vt, page) not in self.table, "map over a mapped page"
        self.table[(vt, page)] = self.free.pop()

    def _unmap(self, vt, page):
        phys = self.table.pop((vt, page))
        if phys not in self.table.values():
            self.free.append(phys)

    def _submit(self, run):
        future = SimpleNamespace(ran=False)
        future.done = lambda: future.ran
        future.wait = lambda: self.run_until(future)
        self.queue.append((future, run))
        return future

    def run_until(self, future) -> None:
        while not future.ran:
            self.run_one()

    def run_one(self) -> None:
        f, run = self.queue.pop(0)
        run()
        f.ran = True


def test_wait_ready_returns_only_over_mapped_blocks():
    rng = random.Random()
    slots, per_slot, vts = 5, 6, [SimpleNamespace(id=i) for i in range(2)]
    worker = LazyWorker(pages=slots * per_slot * len(vts))
    books = PageBooks(worker, vts, per_slot, slots)
    for _ in range(300):
        slot = rng.randrange(slots)
        have = len(books.blocks[slot])
        op = rng.random()
        if op < 0.4 and have < per_slot:
            books.map([(slot, rng.randint(have + 1, per_slot))])
        elif op < 0.6 and have:
            books.truncate(slot, rng.randrange(have), None)
        elif op < 0.8:  # share another slot's first blocks, as an admission that hits the prefix cache
            src = rng.randrange(slots)
            if src != slot and books.blocks[src]:
                books.alias_front(slot, [src] * rng.randint(1, len(books.blocks[src])), None)
        for _ in range(rng.randrange(3)):  # the worker gets ahead by a job or two, or not at all
            if worker.queue:
                worker.run_one()
        books.poll()
        slot = rng.randrange(slots)
        n = rng.randint(0, len(books.blocks[slot]))
        books.wait_ready(slot, n)
        for b, lid in enumerate(books.blocks[slot][:n]):
            phys = [worker.table.get((vt.id, slot * per_slot + b)) for vt in vts]
            assert None not in phys, f"slot {slot} block {b}: wait_ready returned before it was mapped"
            for other, blocks in enumerate(books.blocks):  # an alias (same id) shows the same pages, once mapped
                for ob, olid in enumerate(blocks[:books.ready[other]]):
                    if olid == lid:
                        assert [worker.table.get((vt.id, other * per_slot + ob)) for vt in vts] == phys
    books.drain()
    assert not worker.queue
