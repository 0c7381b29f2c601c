"""Property test: random reserve / map / unmap / alias / release sequences against a plain-Python
model of the pool, with every invariant checked after every operation.

The model knows nothing of physical page ids. It gives each mapped physical page a token, and
checks that the allocator's real page ids rename those tokens one to one, that each page holds the
byte its token was written with, and that free + used == total.
"""

import itertools

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from glakeserve.vtensor import (
    AlreadyMappedError,
    NotMappedError,
    OutOfRangeError,
    PagePool,
    PoolExhaustedError,
)

PAGE = 4096
TOTAL = 12


class PoolModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = PagePool(TOTAL, page_size=PAGE, backend="host")
        self.vts = []  # live VTensors
        self.held = {}  # (vt.id, page) -> token of the physical page mapped there
        self.value = {}  # token -> byte written into that physical page
        self.tokens = itertools.count()

    def teardown(self):
        self.pool.close()

    # ----- the model's expectations ------------------------------------------------------
    def pages_of(self, vt):
        return {p for (v, p) in self.held if v == vt.id}

    def used_tokens(self):
        return set(self.held.values())

    def map_error(self, ranges):
        seen = set()
        for vt, first, count in ranges:
            if first < 0 or count < 0 or first + count > vt.num_pages:
                return OutOfRangeError
            for p in range(first, first + count):
                if (vt.id, p) in self.held or (vt.id, p) in seen:
                    return AlreadyMappedError
                seen.add((vt.id, p))
        if len(seen) > TOTAL - len(self.used_tokens()):
            return PoolExhaustedError
        return None

    def unmap_error(self, ranges):
        seen = set()
        for vt, first, count in ranges:
            if first < 0 or count < 0 or first + count > vt.num_pages:
                return OutOfRangeError
            for p in range(first, first + count):
                if (vt.id, p) not in self.held or (vt.id, p) in seen:
                    return NotMappedError
                seen.add((vt.id, p))
        return None

    def alias_error(self, dst, dst_first, src, src_first, count):
        for vt, first in ((src, src_first), (dst, dst_first)):
            if first < 0 or count < 0 or first + count > vt.num_pages:
                return OutOfRangeError
        for i in range(count):
            if (src.id, src_first + i) not in self.held:
                return NotMappedError
            if (dst.id, dst_first + i) in self.held:
                return AlreadyMappedError
        return None

    def write_page(self, vt, page, token, value):
        self.held[(vt.id, page)] = token
        self.value[token] = value
        vt.view(torch.uint8, (PAGE,), offset=page * PAGE).fill_(value)

    def expect(self, error, action):
        before = self.pool.stats()
        if error is None:
            action()
            return True
        try:
            action()
        except error:
            after = self.pool.stats()
            assert (after.free_pages, after.mappings) == (before.free_pages, before.mappings)
            return False
        raise AssertionError(f"expected {error.__name__}")

    # ----- rules -------------------------------------------------------------------------
    @rule(pages=st.integers(1, 6))
    def reserve(self, pages):
        self.vts.append(self.pool.reserve(pages * PAGE))

    @precondition(lambda self: self.vts)
    @rule(i=st.integers(0, 99))
    def release(self, i):
        vt = self.vts.pop(i % len(self.vts))
        vt.release()
        self.held = {k: t for k, t in self.held.items() if k[0] != vt.id}

    @precondition(lambda self: self.vts)
    @rule(i=st.integers(0, 99), first=st.integers(-1, 6), count=st.integers(0, 4),
          value=st.integers(1, 255), use_async=st.booleans())
    def map(self, i, first, count, value, use_async):
        vt = self.vts[i % len(self.vts)]
        items = [(vt, first, count)]
        action = (lambda: self.pool.map_async(items).wait()) if use_async else (lambda: self.pool.map_batch(items))
        if self.expect(self.map_error(items), action):
            for p in range(first, first + count):
                self.write_page(vt, p, next(self.tokens), value)

    @precondition(lambda self: len(self.vts) >= 2)
    @rule(i=st.integers(0, 99), j=st.integers(0, 99), a=st.integers(0, 5), b=st.integers(0, 5),
          n=st.integers(0, 3), value=st.integers(1, 255))
    def map_two_ranges(self, i, j, a, b, n, value):
        items = [(self.vts[i % len(self.vts)], a, n), (self.vts[j % len(self.vts)], b, n)]
        if self.expect(self.map_error(items), lambda: self.pool.map_batch(items)):
            for vt, first, count in items:
                for p in range(first, first + count):
                    self.write_page(vt, p, next(self.tokens), value)

    @precondition(lambda self: self.vts)
    @rule(i=st.integers(0, 99), first=st.integers(-1, 6), count=st.integers(0, 4), use_async=st.booleans())
    def unmap(self, i, first, count, use_async):
        vt = self.vts[i % len(self.vts)]
        items = [(vt, first, count)]
        action = (lambda: self.pool.unmap_async(items).wait()) if use_async else (lambda: self.pool.unmap_batch(items))
        if self.expect(self.unmap_error(items), action):
            for p in range(first, first + count):
                del self.held[(vt.id, p)]

    @precondition(lambda self: self.vts)
    @rule(i=st.integers(0, 99), j=st.integers(0, 99), dst_first=st.integers(-1, 6),
          src_first=st.integers(-1, 6), count=st.integers(0, 3))
    def alias(self, i, j, dst_first, src_first, count):
        dst = self.vts[i % len(self.vts)]
        src = self.vts[j % len(self.vts)]
        error = self.alias_error(dst, dst_first, src, src_first, count)
        if self.expect(error, lambda: dst.alias(dst_first, src, src_first, count)):
            for k in range(count):
                self.held[(dst.id, dst_first + k)] = self.held[(src.id, src_first + k)]

    # ----- invariants, after every step -----------------------------------------------------
    @invariant()
    def books_balance(self):
        self.pool.check_integrity()
        s = self.pool.stats()
        tokens = self.used_tokens()
        assert s.total_pages == TOTAL
        assert s.used_pages == len(tokens) and s.free_pages == TOTAL - len(tokens)
        assert s.mappings == len(self.held)
        holders = {t: sum(1 for x in self.held.values() if x == t) for t in tokens}
        assert s.shared_pages == sum(1 for n in holders.values() if n > 1)
        assert s.num_vtensors == len(self.vts)

    @invariant()
    def pages_match_the_model(self):
        rename = {}  # token -> real physical page id: must be one to one
        for vt in self.vts:
            st_ = vt.stats()
            assert set(st_.mapped_pages) == self.pages_of(vt)
            for page, phys in zip(st_.mapped_pages, st_.physical_pages):
                token = self.held[(vt.id, page)]
                assert rename.setdefault(token, phys) == phys
                assert st_.shared_pages == sum(
                    1 for p in st_.mapped_pages
                    if sum(1 for x in self.held.values() if x == self.held[(vt.id, p)]) > 1
                )
                data = vt.view(torch.uint8, (PAGE,), offset=page * PAGE)
                assert int(data[0]) == self.value[token] and int(data[-1]) == self.value[token]
        assert len(set(rename.values())) == len(rename)


PoolModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestPoolModel = PoolModel.TestCase
