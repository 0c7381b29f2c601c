"""The KV seam's contract, once for every cache (vTensor token-major and per-layer, the paged
baseline), on fresh random operations with the books checked after each; then what only vTensor
slots do: map ahead on the worker without overcommitting, reuse idle slots' pages, reclaim them
least recently used first, and keep every driver call off the caller's thread."""

import random

import pytest
import torch

from glakeserve.kv import KVCacheTooSmallError, PagedKVCache, VTensorKVCache
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.scheduler import ScheduledBatch
from glakeserve.vtensor import PagePool
from helpers import bare_request

CFG = DUMMY_SHAPES["tiny-llama"]  # fp32: 1 KiB of KV a token (token-major), 256 B per vTensor per-layer
CACHES = ["token-major", "page-major", "per-layer", "paged"]


def make(kind: str, pages: int = 64, max_len: int = 64, slots: int = 4):
    """A cache of `pages` blocks' worth of memory (4 tokens a block token-major and paged-sized, 16
    per-layer)."""
    if kind == "paged":
        return PagedKVCache(CFG, torch.float32, torch.device("cpu"), max_len, slots, memory_bytes=pages * 16 * 1024)
    per_block = 2 * CFG.num_layers if kind == "per-layer" else 1
    pool = PagePool(pages * per_block, page_size=4096, backend="host")
    return VTensorKVCache(pool, CFG, torch.float32, max_len, slots, layout=kind, prefix_caching=False, owns_pool=True)


def step(kv, reqs):
    """One step over the running requests: begin, write each one's new positions, end."""
    batch = ScheduledBatch(requests=list(reqs), num_new_tokens=[1] * len(reqs),
                           starts=[r.num_computed_tokens - 1 for r in reqs])
    kv.begin_step(batch)
    for r in reqs:  # touch the KV the step writes: a slot whose page is not mapped would fault here
        pos = r.num_computed_tokens - 1
        if kv.block_table is None and kv.k_cache(0).dim() == 5:  # page-major
            kv.k_cache(0)[r.slot.index, pos // 4, pos % 4].fill_(1.0)
        elif kv.block_table is None:
            kv.k_cache(0)[r.slot.index, pos].fill_(1.0)
        else:
            block = int(kv.block_table[r.slot.index, pos // 16])
            kv.k_cache(0)[block, pos % 16].fill_(1.0)
    kv.end_step(batch, None)


@pytest.mark.parametrize("kind", CACHES)
def test_the_contract_under_random_operations(kind):
    """admit / reserve / release in random order against a model of what must hold: a running
    request's tokens are always backed, no slot is given twice, released memory comes back."""
    kv = make(kind, pages=40)
    rng = random.Random()
    running, ids = [], 0
    for _ in range(300):
        op = rng.random()
        if op < 0.3 and len(running) < 4:
            r = bare_request(str(ids), [rng.randrange(1000) for _ in range(rng.randrange(1, 40))])
            ids += 1
            if kv.admit(r):
                assert r.slot is not None and r.slot.owner == r.request_id
                assert all(r.slot is not o.slot for o in running)
                assert 0 <= r.num_computed_tokens < r.num_tokens
                if kv.reserve(r, r.num_tokens):
                    r.num_computed_tokens = r.num_tokens
                    running.append(r)
                else:
                    kv.release(r)
        elif op < 0.5 and running:
            r = running.pop(rng.randrange(len(running)))
            kv.release(r)
            assert r.slot is None
        elif running:
            for r in [r for r in running if r.num_tokens >= 64]:  # at max_model_len: done
                running.remove(r)
                kv.release(r)
            for r in running:
                r.output_token_ids.append(rng.randrange(1000))
            grown = [r for r in running if kv.reserve(r, r.num_tokens)]
            for r in grown:
                r.num_computed_tokens = r.num_tokens
            step(kv, grown)
        kv.check_integrity({r.slot.index: r.num_computed_tokens for r in running})
    for r in running:
        kv.release(r)
    kv.drop_cached()
    s = kv.stats()
    assert s.request_pages == 0 and s.cached_pages == 0
    assert s.free_pages == s.total_pages - s.pages_per_block  # all but the padding slot's block
    kv.close()


@pytest.mark.parametrize("kind", CACHES)
def test_reserve_fails_only_when_nothing_idle_is_left(kind):
    T = 16 if kind in ("per-layer", "paged") else 4  # tokens a block holds
    kv = make(kind, pages=20, max_len=10 * T)
    a, b = bare_request("a", [1] * T * 10), bare_request("b", [2] * T * 9)
    assert kv.admit(a) and kv.reserve(a, T * 10)
    assert kv.admit(b) and kv.reserve(b, T * 9)  # 19 + the padding slot's: full
    c = bare_request("c", [3] * T * 2)
    assert kv.admit(c) and not kv.reserve(c, T * 2)
    kv.release(a)  # idle: its pages may be taken back now
    assert kv.reserve(c, T * 2)
    kv.check_integrity({b.slot.index: T * 9, c.slot.index: 0})
    kv.close()


@pytest.mark.parametrize("kind", CACHES)
def test_a_pool_too_small_for_one_request_says_so(kind):
    T = 16 if kind in ("per-layer", "paged") else 4
    with pytest.raises(KVCacheTooSmallError, match="raise kv_cache_memory or lower max_model_len"):
        make(kind, pages=8, max_len=8 * T)  # 8 blocks and the padding slot's


def test_an_idle_slot_keeps_its_pages_for_the_next_request():
    kv = make("token-major", pages=64)
    a = bare_request("a", [1] * 24)
    assert kv.admit(a) and kv.reserve(a, 24)  # 6 blocks
    slot = a.slot
    kv.release(a)
    used = kv.stats().free_pages
    b = bare_request("b", [2] * 20)
    assert kv.admit(b) and b.slot is slot and kv.reserve(b, 20)  # the idle slot already fits: no map
    assert kv.stats().free_pages == used
    kv.check_integrity({slot.index: 0})
    kv.close()


def test_reclaiming_takes_the_least_recently_used_idle_slot_first():
    kv = make("token-major", pages=25)
    reqs = [bare_request(str(i), [i] * 24) for i in range(3)]  # 6 blocks each
    for r in reqs:
        assert kv.admit(r) and kv.reserve(r, 24)
    slots = [r.slot for r in reqs]
    for r in (reqs[1], reqs[0], reqs[2]):  # idle order: 1, 0, 2
        kv.release(r)
    d = bare_request("d", [9] * 60)  # 15 blocks: the fitting-most idle slot has 6
    assert kv.admit(d) and kv.reserve(d, 60)
    held = [len(kv.books.blocks[s.index]) for s in slots]
    assert d.slot is slots[1]  # none fits: of the idle slots mapping the most, the least recently used
    # 9 blocks more were needed and 6 were free: the longest idle of the others gave its pages back
    assert held == [0, 15, 6]
    assert kv.stats().reclaimed_pages == 6
    kv.check_integrity({d.slot.index: 0})
    kv.close()


def test_map_ahead_is_queued_on_the_worker_and_never_overcommits():
    kv = make("token-major", pages=40, max_len=128)
    reqs = [bare_request(str(i), [i] * 4) for i in range(4)]
    for r in reqs:
        assert kv.admit(r) and kv.reserve(r, 4)
        r.num_computed_tokens = 4
    before = kv.pool.stats()
    rng = random.Random()
    for _ in range(30):
        kv.lookahead_tokens = rng.randrange(4, 200)
        step(kv, reqs)
        kv.check_integrity({r.slot.index: r.num_computed_tokens for r in reqs})  # drains: raises if a job failed
    after = kv.pool.stats()
    assert after.async_pages > before.async_pages  # the worker mapped ahead
    assert after.sync_driver_calls == before.sync_driver_calls  # and nothing ran on this thread
    assert kv.stats().engine_driver_calls == 0
    kv.close()
