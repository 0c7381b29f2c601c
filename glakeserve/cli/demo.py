"""The short demo workload `glake inspect-memory` shows when given nothing to attach to.

Four requests' KV caches on vTensors with the SmolLM2-135M shape: each request reserves room for
its whole context, and pages are mapped only for the tokens it holds; one request shares the first
pages of another (a common system prompt) by aliasing them.
"""

from __future__ import annotations

from glakeserve.vtensor import PagePool

# SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, float32 on the CPU -> bytes of K and V per token
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
MAX_TOKENS = 2048


def run_demo(pool_pages: int = 96, backend: str = "auto") -> PagePool:
    pool = PagePool(pool_pages, backend=backend)
    ps = pool.page_size
    tokens_per_page = ps // KV_BYTES_PER_TOKEN

    def pages_for(tokens: int) -> int:
        return -(-tokens // tokens_per_page)

    requests = {"req-0 (chat, long)": 1500, "req-1 (short)": 120, "req-2 (growing)": 700}
    slots = {}
    for name, tokens in requests.items():
        vt = pool.reserve(MAX_TOKENS * KV_BYTES_PER_TOKEN, name)
        slots[name] = vt
        pool.map_batch([(vt, 0, pages_for(tokens))])
    # req-2 grows by another 300 tokens: its next pages are mapped by the worker, off the hot path
    grow = slots["req-2 (growing)"]
    start = pages_for(700)
    pool.map_async([(grow, start, pages_for(1000) - start)]).wait()
    # req-3 starts with the same 3 pages of system prompt as req-0 and aliases them
    shared = pool.reserve(MAX_TOKENS * KV_BYTES_PER_TOKEN, "req-3 (shares req-0's prefix)")
    shared.alias(0, slots["req-0 (chat, long)"], 0, 3)
    shared.map(3, 2)
    return pool
