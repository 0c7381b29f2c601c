"""The vTensor KV cache on a GPU (skipped elsewhere): kernels over exactly the mapped context of
each slot (a read past it is an illegal address, which fails here rather than in a benchmark), and
the mapping worker's ordering against kernels: a map queued then read at once, an unmap queued right
after a kernel that reads the page (the worker waits for the kernel's event)."""

import random

import pytest
import torch

from glakeserve.attention import triton_ops as ops
from glakeserve.kv import VTensorKVCache
from glakeserve.kv.vtensor_cache import default_page_size
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.scheduler import ScheduledBatch
from glakeserve.vtensor import PagePool
from helpers import bare_request

pytestmark = pytest.mark.gpu
CFG = DUMMY_SHAPES["llama-3-8b"]


def cache(layout: str, batch: int, ctx: int, layers: int = 1) -> tuple[VTensorKVCache, list]:
    from dataclasses import replace

    cfg = replace(CFG, num_layers=layers)
    per_token = cfg.num_kv_heads * cfg.head_dim * 2 * (1 if layout == "per-layer" else 2 * layers)
    page = default_page_size(per_token, 2 << 20, host=False)
    per_block = 2 * layers if layout == "per-layer" else 1
    blocks = -(-ctx * per_token // page)
    pool = PagePool((batch + 1) * blocks * per_block + per_block, page_size=page, backend="cuda")
    kv = VTensorKVCache(pool, cfg, torch.bfloat16, ctx, batch, layout=layout, prefix_caching=False,
                        lookahead_tokens=0, owns_pool=True)
    reqs = [bare_request(f"r{i}", [1] * ctx) for i in range(batch)]
    for r in reqs:
        assert kv.admit(r) and kv.reserve(r, ctx)
        r.num_computed_tokens = ctx
    kv.begin_step(ScheduledBatch(requests=reqs, num_new_tokens=[ctx] * batch, starts=[0] * batch))
    return kv, reqs


def reference(q, k, v, causal_from: int | None = None):
    """q [n, H, D] against k, v [ctx, KVH, D] in float32."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, 1).transpose(0, 1)
    v = v.float().repeat_interleave(groups, 1).transpose(0, 1)
    s = (q.float().transpose(0, 1) @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    if causal_from is not None:
        n, ctx = q.shape[0], k.shape[1]
        s = s.masked_fill(~torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n), float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("layout", ["token-major", "page-major", "per-layer"])
@pytest.mark.parametrize("batch,ctx", [(1, 512), (16, 2048), (64, 4096), (1, 8192)])
def test_kernels_read_exactly_the_mapped_context(layout, batch, ctx):
    kv, reqs = cache(layout, batch, ctx)
    slots = torch.tensor([r.slot.index for r in reqs], device="cuda")
    k, v = kv.k_cache(0), kv.v_cache(0)
    H, KVH, D = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim

    def seq(cache, s):  # [ctx, KVH, D] of slot s, whichever the layout (mapped pages only)
        return cache[s, :-(-ctx // cache.shape[2])].flatten(0, 1)[:ctx] if cache.dim() == 5 else cache[s, :ctx]

    for s in slots.tolist():
        for view in (k, v):
            data = torch.randn(ctx, KVH, D, dtype=torch.bfloat16, device="cuda")
            if view.dim() == 5:  # page by page: a slice past the mapped pages would fault
                page = view.shape[2]
                for p in range(-(-ctx // page)):
                    n = min(page, ctx - p * page)
                    view[s, p, :n] = data[p * page:p * page + n]
            else:
                view[s, :ctx] = data
    lens = torch.full((batch,), ctx, device="cuda")
    q = torch.randn(batch, H, D, dtype=torch.bfloat16, device="cuda")
    splits = max(1, min(16, -(-264 // (batch * KVH))))
    out = ops.decode_attention(q, k, v, slots, lens, splits)
    n = 64  # extend: the last 64 positions of each slot as new tokens after the cached rest
    qe = torch.randn(batch * n, H, D, dtype=torch.bfloat16, device="cuda")
    starts = torch.arange(0, batch * n + 1, n, device="cuda")
    oe = ops.extend_attention(qe, k, v, slots, starts, torch.full((batch,), n, device="cuda"), lens, n)
    torch.cuda.synchronize()  # an illegal address surfaces here
    for i in random.sample(range(batch), min(batch, 4)):
        s = int(slots[i])
        torch.testing.assert_close(out[i].float(), reference(q[i:i + 1], seq(k, s), seq(v, s))[0],
                                   atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(oe[i * n:(i + 1) * n].float(),
                                   reference(qe[i * n:(i + 1) * n], seq(k, s), seq(v, s), causal_from=0),
                                   atol=2e-2, rtol=2e-2)
    kv.close()


def test_maps_and_unmaps_on_the_worker_stay_ordered_with_kernels():
    """Repeatedly: a map queued and a kernel launched at once on what it maps (the cache waits only
    for that job); then the slot released and its pages reclaimed (an unmap queued right after the
    kernel, which the worker holds back until the kernel's event). Results exact, no illegal address."""
    kv, reqs = cache("token-major", 4, 2048, layers=2)  # 256 tokens a block
    rng = random.Random()
    for it in range(40):
        r = reqs[it % 4]
        kv.release(r)
        kv.drop_cached()  # its pages go back: unmaps queued behind the last kernel's event
        fresh = bare_request(f"n{it}", [1] * rng.randrange(1, 2048))
        assert kv.admit(fresh) and kv.reserve(fresh, fresh.num_tokens)
        fresh.num_computed_tokens = fresh.num_tokens
        batch = ScheduledBatch(requests=[fresh], num_new_tokens=[fresh.num_tokens], starts=[0])
        kv.begin_step(batch)  # waits for exactly the map job this slot needs
        s, n = fresh.slot.index, fresh.num_tokens
        data = torch.randn(n, CFG.num_kv_heads, CFG.head_dim, dtype=torch.bfloat16, device="cuda")
        kc = kv.k_cache(1)
        kc[s, :n] = data
        total = kc[s, :n].float().sum()  # a kernel reading every mapped page of the slot
        event = torch.cuda.Event()
        event.record()
        kv.end_step(batch, event)
        assert torch.equal(kc[s, :n], data) and torch.isclose(total, data.float().sum())
        reqs[it % 4] = fresh
    kv.check_integrity({r.slot.index: r.num_computed_tokens for r in reqs})
    assert kv.stats().engine_driver_calls == 0
    kv.close()
