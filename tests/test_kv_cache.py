"""The KV cache policy: both layouts' address arithmetic, best-fit reuse of idle slots, reclaiming
idle pages when the pool runs short, map-ahead on the worker."""

import random

import pytest
import torch

from glakeserve.attention.torch_ref import TorchReferenceBackend
from glakeserve.kv_cache import KVCache, KVCacheTooSmallError
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.vtensor import PagePool

CFG = DUMMY_SHAPES["tiny-llama"]  # 2 layers, 2 KV heads of 32 dims


def make(layout, pages=64, page=4096, max_len=64, slots=4):
    pool = PagePool(pages, page_size=page, backend="host")
    return pool, KVCache(pool, CFG, torch.float32, max_len, slots, layout=layout, lookahead_tokens=8)


@pytest.mark.parametrize("layout", ["token-major", "per-layer"])
def test_views_address_the_documented_layout(layout):
    pool, kv = make(layout)
    L, kvh, d = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
    slot, pos = 2, 13
    kv.slots[slot].owner = "r"
    assert kv.ensure(kv.slots[slot], pos + 1)
    meta = TorchReferenceBackend().prepare_metadata([slot], [1], [pos + 1], torch.device("cpu"))
    for layer in range(L):
        k = torch.randn(1, kvh, d)
        v = torch.randn(1, kvh, d)
        TorchReferenceBackend().store_kv(kv.k_cache(layer), kv.v_cache(layer), k, v, meta)
        for which, x in ((0, k), (1, v)):
            if layout == "token-major":  # slot s: [max_len, layers, 2, kvh, d]
                raw = kv.vtensors[0].view(torch.float32, (kv.slot_stride // 4,), offset=slot * kv.slot_stride)
                at = ((pos * L + layer) * 2 + which) * kvh * d
            else:  # vTensor L{layer}.{K|V}, slot s: [max_len, kvh, d]
                raw = kv.vtensors[2 * layer + which].view(torch.float32, (kv.slot_stride // 4,),
                                                           offset=slot * kv.slot_stride)
                at = pos * kvh * d
            assert torch.equal(raw[at:at + kvh * d], x.flatten())
    kv.close()
    pool.close()


def test_best_fit_reuse_of_idle_slots():
    pool, kv = make("token-major", pages=256, slots=4)
    held = []
    for i, tokens in enumerate([8, 30, 60]):  # 1 KiB a token, 4 per page: 2, 8, 15 pages
        held.append(kv.acquire_slot(f"r{i}", tokens))
        assert kv.ensure(held[-1], tokens)
    for s in held:
        kv.release_slot(s, keep_pages=True)
    by_pages = {s.target: s.index for s in kv.slots}
    assert kv.acquire_slot("a", 20).index == by_pages[8]  # 5 pages: the 8-page slot fits best
    assert kv.acquire_slot("b", 64).index == by_pages[15]  # nothing holds 16: take the most mapped
    kv.close()
    pool.close()


def test_pool_short_reclaims_idle_pages_longest_idle_first():
    pool, kv = make("token-major", pages=21, slots=4)  # 20 pages for requests (80 tokens) + the anchor's
    a = kv.acquire_slot("a", 24)
    assert kv.ensure(a, 24)  # 6 pages
    kv.release_slot(a, keep_pages=True)
    b = kv.acquire_slot("b", 24)  # best fit: a's slot again, no new pages
    assert b is a and kv.ensure(b, 24) and pool.stats().used_pages == 6 + 1  # + the anchor page
    c = kv.acquire_slot("c", 40)
    assert kv.ensure(c, 40)  # 10 more pages
    kv.release_slot(b, keep_pages=True)
    d = kv.acquire_slot("d", 64)  # takes b's idle slot (the most mapped): needs 10 more, 4 are free
    assert d is b
    assert not kv.ensure(d, 64)  # c runs and nothing else is idle: no room
    kv.release_slot(c, keep_pages=True)  # now c's pages are idle and may be taken back
    assert kv.ensure(d, 64)
    assert kv.reclaimed_pages == 10 and c.mapped == 0
    kv.check_integrity({d.index: 64})
    kv.close()
    pool.close()


def test_map_ahead_queues_pages_for_later_steps():
    pool, kv = make("per-layer", pages=128, slots=4)
    s = kv.acquire_slot("r", 10)
    assert kv.ensure(s, 10)
    mapped_before = pool.stats().pages_mapped
    kv.map_ahead([(s, 10 + kv.lookahead_tokens)])
    assert s.target >= kv.pages_for(18)
    kv._drain()
    async_pages = pool.stats().pages_mapped - mapped_before
    assert async_pages == (s.target - kv.pages_for(10)) * len(kv.vtensors)
    assert kv.ensure(s, 18)  # already there: no synchronous mapping
    assert pool.stats().pages_mapped - mapped_before == async_pages
    kv.check_integrity({s.index: 18})
    kv.close()
    pool.close()


def test_map_ahead_never_overcommits_the_pool():
    pool, kv = make("token-major", pages=24, slots=6)
    slots = [kv.acquire_slot(f"r{i}", 4) for i in range(6)]
    for s in slots:
        assert kv.ensure(s, 4)
    for _ in range(10):  # queue look-ahead for all, repeatedly: the queued total must fit
        kv.map_ahead([(s, random.randint(4, 64)) for s in slots])
    kv._drain()  # raises if any job ran out of pages
    kv.check_integrity({s.index: 4 for s in slots})
    kv.close()
    pool.close()


def test_pool_too_small_for_one_request():
    with pytest.raises(KVCacheTooSmallError, match=r"one request of max_model_len=64 tokens needs 16 \("):
        make("token-major", pages=8)
