"""The KV cache on vTensors: which request gets which slot, which blocks to map (ahead, on the
worker), what idle slots keep for reuse (the prefix cache) and what they give back when the pool runs
short. Policy only; the allocator is mechanism, and every driver call it makes runs on its worker.

Every slot is one contiguous virtual range per vTensor, of room for max_model_len tokens:

  token-major (one vTensor)             per-layer (2 * layers vTensors: L0.K, L0.V, L1.K, ...)
  slot s: [max_len, layers, 2, kvh, d]  slot s of Li.K: [max_len, kvh, d]
  |tok0: L0K L0V L1K ... |tok1: ...|    |tok0|tok1|tok2| ... (one layer, K only)
  a page holds whole tokens' KV         a page holds many tokens of one layer
  of every layer                        (waste: up to one page per layer, K and V)

  page-major (one vTensor; a page holds T whole tokens, as token-major)
  slot s: [pages, layers, 2, T, kvh, d]
  |page0: L0K(tok0..T-1) L0V(tok0..T-1) L1K(...) ... |page1: ...|
  one layer's K of a page's tokens lie together, as in a paged block: kernels read runs, not rows

Kernels see `k_cache(layer)[slot, pos, kv_head, dim]` (page-major: `[slot, page, pos_in_page,
kv_head, dim]`): a strided view either way, no block table. A slot's mapped
blocks are always a prefix of its range (PageBooks). Slot 0 is the anchor: one block mapped for the
engine's whole life, the base address Triton's launcher asks the driver about, and the slot CUDA
graphs pad their batches with.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque

import torch

from glakeserve.kv.base import ANCHOR, KVCache, KVCacheTooSmallError, KVLayout, KVStats, Slot
from glakeserve.kv.books import PageBooks
from glakeserve.kv.prefix import PrefixIndex
from glakeserve.model.config import ModelConfig
from glakeserve.vtensor import PagePool, VTensor

MIN_TOKENS_PER_PAGE = 16  # so mapping work per token stays small for every shape
SCAN_IDLE = 64  # idle slots looked at (least recently used first) for one that already fits


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_page_size(bytes_per_token: int, granularity: int, host: bool) -> int:
    """A page that holds at least 16 tokens, in multiples of the backend's granularity; one holding
    whole tokens when that costs at most twice the memory (prefix caching shares whole pages, so it
    needs them; a bigger page wastes more of each request's last page). On the host about 2 MiB when
    that holds more: finer sharing costs nothing there."""
    plain = round_up(MIN_TOKENS_PER_PAGE * bytes_per_token, granularity)
    whole = bytes_per_token * granularity // math.gcd(bytes_per_token, granularity)  # lcm: whole tokens
    aligned = round_up(MIN_TOKENS_PER_PAGE * bytes_per_token, whole)
    if host:
        aligned = max(aligned, (2 << 20) // whole * whole)
    return aligned if aligned <= max(2 * plain, 2 << 20) else plain


class VTensorKVCache(KVCache):
    def __init__(self, pool: PagePool, cfg: ModelConfig, dtype: torch.dtype, max_model_len: int, num_slots: int,
                 layout: KVLayout | str = KVLayout.TOKEN_MAJOR, lookahead_tokens: int = 64,
                 prefix_caching: bool = True, max_pages: int | None = None, owns_pool: bool = False):
        self.pool = pool
        self.owns_pool = owns_pool  # close() closes the pool too
        self.cfg = cfg
        self.dtype = dtype
        self.layout = KVLayout(layout)
        if self.layout is KVLayout.PAGED:
            raise ValueError("the paged layout is glakeserve.kv.paged.PagedKVCache")
        self.max_model_len = max_model_len
        self.num_slots = num_slots + 1  # slot 0 is the anchor; requests get slots 1..num_slots
        L, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        ps = pool.page_size
        if self.layout in (KVLayout.TOKEN_MAJOR, KVLayout.PAGE_MAJOR):
            self.bytes_per_token = L * 2 * kvh * d * dtype.itemsize  # in its one vTensor
            names = ["kv"]
            if self.layout is KVLayout.PAGE_MAJOR and ps % self.bytes_per_token:
                raise ValueError(f"the page-major layout needs pages that hold whole tokens: {ps}-byte pages and "
                                 f"{self.bytes_per_token}-byte tokens do not; use another page size or the "
                                 f"token-major layout")
        else:
            self.bytes_per_token = kvh * d * dtype.itemsize  # in each of its vTensors
            names = [f"L{i}.{kv}" for i in range(L) for kv in "KV"]
        self.slot_stride = round_up(max_model_len * self.bytes_per_token, ps)  # bytes, page aligned
        self.blocks_per_slot = self.slot_stride // ps
        self.vtensors: list[VTensor] = [pool.reserve(self.num_slots * self.slot_stride, n) for n in names]
        self.pages_per_block = len(self.vtensors)
        self.lookahead_tokens = lookahead_tokens
        self.slots = [Slot(i) for i in range(self.num_slots)]
        self.block_table = None  # kernels address slots directly
        self.books = PageBooks(pool, self.vtensors, self.blocks_per_slot, self.num_slots)
        self.idle: OrderedDict[int, float] = OrderedDict((i, 0.0) for i in range(1, self.num_slots))  # LRU first
        self.steps = 0  # steps begun
        self._in_flight: deque[tuple[int, torch.cuda.Event]] = deque()  # launched steps not known complete
        self.prepared: dict[str, int | None] = {}  # request id -> idle slot mapped ahead for it (None: a hit)
        self.reclaimed_pages = 0
        one_request = self.blocks_for(max_model_len) * self.pages_per_block
        total = self.books.total_pages
        if one_request + self.pages_per_block > total:
            raise KVCacheTooSmallError(
                f"the KV cache pool has {total} pages ({total * ps / 2**20:.0f} MiB) but one request of "
                f"max_model_len={max_model_len} tokens needs {one_request} ({one_request * ps / 2**20:.0f} MiB, "
                f"{self.layout.value} layout) besides the padding slot: raise kv_cache_memory or lower max_model_len")
        self.max_pages = max(total, max_pages or total)
        self.min_pages = one_request + self.pages_per_block
        self._views = self._make_views()
        # prefix caching shares whole blocks, so a page must hold whole tokens: a token cut by a page
        # boundary would be rewritten through an alias when a prefix is extended
        self.prefix_disabled_reason = None
        if prefix_caching and ps % self.bytes_per_token:
            self.prefix_disabled_reason = (f"{ps}-byte pages do not hold whole {self.bytes_per_token}-byte tokens "
                                           f"({self.layout.value} layout); prefix caching needs them to")
        self.prefix = PrefixIndex(self.tokens_per_block()) if prefix_caching and not self.prefix_disabled_reason \
            else None
        self.slots[0].owner = ANCHOR
        self.books.map([(0, 1)])
        self.books.wait_ready(0, 1)
        self._driver_calls_at_start = pool.stats().sync_driver_calls  # sizing the pool is not steady state

    # ----- geometry ---------------------------------------------------------------------------
    def _make_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg, S, T = self.cfg, self.num_slots, self.max_model_len
        L, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        isz = self.dtype.itemsize
        stride = self.slot_stride // isz  # elements between slots
        views = []
        P, T_page = self.blocks_per_slot, self.tokens_per_block()
        for layer in range(L):
            if self.layout is KVLayout.TOKEN_MAJOR:  # [S, T, kvh, d] inside [S, T, layers, 2, kvh, d]
                tok = L * 2 * kvh * d
                k, v = (self.vtensors[0].view(self.dtype, (S, T, kvh, d), (stride, tok, d, 1),
                                              offset=(layer * 2 + kv) * kvh * d * isz) for kv in (0, 1))
            elif self.layout is KVLayout.PAGE_MAJOR:  # [S, P, T_page, kvh, d] inside [S, P, layers, 2, T_page, kvh, d]
                page = self.pool.page_size // isz
                k, v = (self.vtensors[0].view(self.dtype, (S, P, T_page, kvh, d), (stride, page, kvh * d, d, 1),
                                              offset=(layer * 2 + kv) * T_page * kvh * d * isz) for kv in (0, 1))
            else:
                k, v = (self.vtensors[2 * layer + kv].view(self.dtype, (S, T, kvh, d), (stride, kvh * d, d, 1))
                        for kv in (0, 1))
            views.append((k, v))
        return views

    def k_cache(self, layer: int) -> torch.Tensor:
        """[slots, max_model_len, kv_heads, dim]; page-major [slots, pages, page_tokens, kv_heads, dim]."""
        return self._views[layer][0]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._views[layer][1]

    def tokens_per_block(self) -> int:
        return self.pool.page_size // self.bytes_per_token

    def blocks_for(self, tokens: int) -> int:  # bytes, not whole tokens: a page may end inside a token
        return -(-tokens * self.bytes_per_token // self.pool.page_size)

    def kv_bytes_per_token(self) -> int:
        return self.bytes_per_token * len(self.vtensors)

    # ----- slots ------------------------------------------------------------------------------
    def admit(self, req) -> bool:
        if not self.idle:
            return False
        ids = req.all_token_ids
        limit = req.cacheable_tokens  # at least the last token is computed: it yields the next token's logits
        found = self.prefix.match(ids, limit) if self.prefix is not None else []
        own = [s for s in found[-1].holders if s in self.idle] if found else []
        if own:  # an idle slot already holds the start: take it, nothing moves (a chat's next turn)
            slot = self.slots[max(own, key=lambda s: (_common(self.slots[s].tokens, ids, limit), self.idle[s]))]
            cached = _common(slot.tokens, ids, limit)
        else:
            index = self.prepared.pop(req.request_id, None)
            slot = self.slots[index] if index in self.idle else self._pick_idle(self.blocks_for(len(ids)))
            cached = len(found) * self.tokens_per_block()
        del self.idle[slot.index]
        slot.owner = req.request_id
        if found and not own:  # alias the cached blocks into this slot from their holders
            self.prefix.remove(slot.index, slot.keys, 0)
            self.books.alias_front(slot.index, [min(e.holders) for e in found], self._unmap_after(slot))
            slot.keys = [e.key for e in found]
            self.prefix.add(slot.index, slot.keys, ids, 0, len(found))
        cached = self._make_writable(slot, cached)
        if self.prefix is not None:
            self.prefix.count_hit(cached, bool(own), 0 if own else len(found))
        slot.tokens = []  # while it runs, the request's tokens are the slot's
        req.slot = slot
        req.num_computed_tokens = cached
        return True

    def _make_writable(self, slot: Slot, cached: int) -> int:
        """The request writes from token `cached` on: no block it writes may be shared, and the index
        forgets the blocks whose bytes change. Returns the tokens still cached (fewer when the block
        where writing starts was shared: it is replaced, and its tokens recomputed)."""
        T = self.tokens_per_block()
        start = cached // T
        shared = self.books.first_shared(slot.index, start)
        if shared is not None:
            self.books.truncate(slot.index, shared, self._unmap_after(slot))
            if shared == start:
                cached = start * T
        if self.prefix is not None:
            self.prefix.remove(slot.index, slot.keys, start)
        return cached

    def _pick_idle(self, blocks: int) -> Slot:
        """For a request with no cached prefix: the least recently used idle slot (its KV is the
        least likely to be asked for again) among those already mapping `blocks` blocks; else, of
        the first few, the one mapping the most. Slots prepared for other requests come last."""
        best = None
        taken = {i for i in self.prepared.values() if i is not None}
        for i, index in enumerate(self.idle):
            if index in taken and len(taken) < len(self.idle):
                continue
            have = len(self.books.blocks[index])
            if have >= blocks:
                return self.slots[index]
            if best is None or have > len(self.books.blocks[best]):
                best = index
            if i >= SCAN_IDLE:
                break
        return self.slots[best]

    def reserve(self, req, tokens: int) -> bool:
        need = self.blocks_for(tokens)
        if need > self.blocks_per_slot:
            raise ValueError(f"{tokens} tokens exceed max_model_len={self.max_model_len}")
        slot = req.slot.index
        extra = (need - len(self.books.blocks[slot])) * self.pages_per_block
        if extra <= 0:
            return True
        if self.books.free_pages() < extra:
            self._reclaim(extra)
            if self.books.free_pages() < extra:
                return False
        self.books.map([(slot, need)])
        return True

    def _reclaim(self, pages: int) -> None:
        """Frees pages until `pages` are free: idle slots give theirs back, least recently used
        first (their index entries go with them); then the pool grows, up to max_pages."""
        for index in list(self.idle):
            if self.books.free_pages() >= pages:
                return
            if not self.books.blocks[index]:
                continue
            freed = self.books.pages_freed_by(index)
            self._forget(self.slots[index])
            self.reclaimed_pages += freed
        short = pages - self.books.free_pages()
        if short > 0:
            grow = min(self.max_pages - self.books.total_pages, max(short, 64 * self.pages_per_block))
            grow -= grow % self.pages_per_block
            if grow > 0:
                self.books.grow(grow)

    def _forget(self, slot: Slot) -> None:
        """An idle slot gives up everything it holds."""
        if self.prefix is not None:
            self.prefix.remove(slot.index, slot.keys, 0)
        slot.tokens = []
        self.books.truncate(slot.index, 0, self._unmap_after(slot))

    def release(self, req) -> None:
        self.prepared.pop(req.request_id, None)
        slot = req.slot
        ids = req.all_token_ids
        slot.tokens = ids[:min(req.num_computed_tokens, len(ids))]
        self._index(slot, slot.tokens)
        slot.owner = None
        self.idle[slot.index] = time.monotonic()
        self.idle.move_to_end(slot.index)
        req.slot = None

    def _index(self, slot: Slot, tokens: list[int]) -> None:
        """Puts the slot's full blocks of `tokens` (whose KV it holds or a launched step writes) in
        the prefix index: no driver call, the blocks stay where they are."""
        if self.prefix is None:
            return
        full = len(tokens) // self.tokens_per_block()
        if full > len(slot.keys):
            start = len(slot.keys)
            self.prefix.extend_keys(slot.keys, tokens, full)
            self.prefix.add(slot.index, slot.keys, tokens, start, full)

    # ----- a step -----------------------------------------------------------------------------
    def _unmap_after(self, slot: Slot) -> torch.cuda.Event | None:
        """What an unmap of the slot's pages must wait for: the event of the last step whose kernels
        touch the slot, unless that step is known complete (then nothing: most reclaimed slots have
        been idle for many steps)."""
        while self._in_flight and self._in_flight[0][1].query():
            self._in_flight.popleft()
        return next((event for step, event in self._in_flight if step >= slot.last_step), None)

    def begin_step(self, batch) -> None:
        self.books.poll()
        self.steps += 1
        for req in batch.requests:
            req.slot.last_step = self.steps
            self.books.wait_ready(req.slot.index, self.blocks_for(req.num_computed_tokens))

    def end_step(self, batch, event: torch.cuda.Event | None) -> None:
        """Remembers the step's event (unmaps of the slots it touches wait for it), indexes the prompt
        blocks the step computed (so requests admitted next step can share them), and maps ahead on the
        worker, as far as free pages allow and in this order: the blocks the running requests' next
        token needs, the prompts of the next admissions (on idle slots picked for them), then
        lookahead_tokens more for each running request (mapped ahead first, they would take the pages
        a waiting request needs to be admitted, and a small pool would run one request at a time)."""
        if event is not None:
            self._in_flight.append((self.steps, event))
        free = self.books.free_pages()
        planned: dict[int, int] = {}  # slot -> blocks it will have
        wanted = []

        def plan(slot: int, need: int) -> None:
            nonlocal free
            extra = (need - planned.get(slot, len(self.books.blocks[slot]))) * self.pages_per_block
            if 0 < extra <= free:
                free -= extra
                planned[slot] = need
                wanted.append((slot, need))

        running = [r for r in batch.requests if r.slot is not None]  # (None: finished, preempted or aborted meanwhile)
        for req in running:
            if req.num_computed_tokens <= len(req.prompt_token_ids):
                self._index(req.slot, req.prompt_token_ids[:req.num_computed_tokens])
            plan(req.slot.index, min(self.blocks_for(req.num_tokens + 1), self.blocks_per_slot))
        upcoming = {r.request_id for r in batch.upcoming}
        self.prepared = {r: i for r, i in self.prepared.items() if r in upcoming}  # others left the queue
        for req in batch.upcoming:  # the idle slot each next admission will take, mapped for its prompt
            if req.request_id in self.prepared:
                continue
            if self.prefix is not None and self.prefix.match(req.all_token_ids, req.cacheable_tokens, count=False):
                self.prepared[req.request_id] = None  # it will reuse cached blocks: nothing to map
                continue
            slot = self._pick_idle(self.blocks_for(req.num_tokens))
            self.prepared[req.request_id] = slot.index
            plan(slot.index, self.blocks_for(req.num_tokens))
        for req in running:
            plan(req.slot.index, min(self.blocks_for(req.num_tokens + self.lookahead_tokens), self.blocks_per_slot))
        self.books.map(wanted)

    # ----- the pool's life --------------------------------------------------------------------
    def set_limit(self, max_bytes: int) -> dict:
        device_total = self.pool.memory_info()[1]
        if max_bytes > device_total:
            raise ValueError(f"a KV limit of {int(max_bytes)} bytes is more than the device has ({device_total} bytes)")
        pages = int(max_bytes) // self.pool.page_size
        if pages < self.min_pages:
            raise ValueError(f"a KV limit of {int(max_bytes)} bytes ({pages} pages) cannot hold one request of "
                             f"max_model_len={self.max_model_len} tokens, which needs {self.min_pages} pages "
                             f"({self.min_pages * self.pool.page_size} bytes)")
        self.max_pages = pages
        if self.books.total_pages > pages:
            self.books.shrink(min(self.books.total_pages - pages, self.books.free_pages()))
        total, free = self.books.total_pages, self.books.free_pages()
        return {"max_pages": pages, "max_bytes": pages * self.pool.page_size, "total_pages": total,
                "total_bytes": total * self.pool.page_size, "free_pages": free}

    def release_idle(self) -> int:
        self.drop_cached()
        return self.books.shrink(self.books.free_pages())

    def drop_cached(self) -> None:
        for index in self.idle:
            if self.books.blocks[index]:
                self._forget(self.slots[index])

    # ----- inspection -------------------------------------------------------------------------
    def stats(self) -> KVStats:
        self.books.poll()
        pool = self.pool.stats().__dict__
        held = {lid for s in self.slots[1:] if s.owner is not None for lid in self.books.blocks[s.index]}
        request = len(held) * self.pages_per_block  # a block two requests share counts once
        used = self.books.total_pages - self.books.free_pages() - self.pages_per_block  # the anchor's: nobody's
        return KVStats(
            layout=self.layout.value, page_size=self.pool.page_size, pages_per_block=self.pages_per_block,
            tokens_per_block=self.tokens_per_block(), total_pages=self.books.total_pages,
            free_pages=self.books.free_pages(), request_pages=min(request, used), cached_pages=max(0, used - request),
            max_pages=self.max_pages, mapping_waits=self.books.waits, engine_driver_calls=pool["sync_driver_calls"] - self._driver_calls_at_start,
            reclaimed_pages=self.reclaimed_pages, pool=pool,
            prefix=self.prefix.stats() if self.prefix is not None else None,
            prefix_disabled_reason=self.prefix_disabled_reason)

    def slot_stats(self, tokens: dict[int, int]) -> list[dict]:
        n = self.pages_per_block
        books = self.books
        out = []
        for s in self.slots:
            held = tokens.get(s.index, len(s.tokens))
            blocks = len(books.blocks[s.index])
            out.append({
                "slot": s.index, "owner": s.owner, "internal": s.owner == ANCHOR, "tokens": held,
                "mapped_pages": min(books.ready[s.index], blocks) * n,
                "queued_pages": max(0, blocks - books.ready[s.index]) * n,
                "shared_pages": books.shared_blocks(s.index) * n,
                "reserved_pages": self.blocks_per_slot * n,
                "waste_bytes": max(0, blocks * self.pool.page_size - held * self.bytes_per_token) * n,
            })
        return out

    def snapshot(self) -> dict:
        return self.pool.snapshot()

    def check_integrity(self, tokens: dict[int, int]) -> None:
        """The books equal the allocator (after the worker drains); each slot maps what its tokens
        need; no block a running request writes is shared; the index points only at blocks whose
        holders hold those very tokens."""
        self.books.check()
        self.pool.check_integrity()
        T = self.tokens_per_block()
        for s in self.slots[1:]:
            held = tokens.get(s.index)
            if s.owner is None:
                assert held is None and s.index in self.idle, s.index
                held = len(s.tokens)
            else:
                assert s.index not in self.idle, s.index
                shared = self.books.first_shared(s.index, held // T)
                assert shared is None, f"slot {s.index}: block {shared} is shared but its request writes there"
            assert len(self.books.blocks[s.index]) >= self.blocks_for(held), (s.index, held)
        if self.prefix is not None:
            self.prefix.check_integrity({s.index: s.keys for s in self.slots})
            for s in self.slots[1:]:
                if s.owner is None:  # an idle slot's keys are its tokens' chain
                    assert s.keys == self.prefix.extend_keys([], s.tokens, len(s.keys)), s.index
                    assert len(s.keys) <= len(s.tokens) // T, s.index

    def close(self) -> None:
        if self.pool.closed:
            return
        self.books.drain()
        for vt in self.vtensors:
            vt.release()
        if self.owns_pool:
            self.pool.close()


def _common(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common start of a and b, at most limit."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
