"""The KV cache on vTensors: which request owns which slot, which pages to map (now or ahead, on the
worker), and which to take back when the pool runs short. Policy only; the allocator is mechanism.

Every slot is one contiguous virtual range per vTensor, of room for max_model_len tokens:

  token-major (one vTensor)            per-layer (2 * layers vTensors: L0.K, L0.V, L1.K, ...)
  slot s: [max_len, layers, 2, kvh, d]   slot s of Li.K: [max_len, kvh, d]
  |tok0: L0K L0V L1K ... |tok1: ...|     |tok0|tok1|tok2| ... (one layer, K only)
  a page holds whole tokens' KV          a page holds many tokens of one layer
  of every layer                         (waste: up to one page per layer, K and V)

Kernels see `k_cache(layer)[slot, pos, kv_head, dim]`: a strided view either way. A slot's pages are
always mapped as a prefix of its range; `mapped[slot]` (per vTensor) says how many.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from glakeserve.model.config import ModelConfig
from glakeserve.prefix_cache import ROOT, PrefixCache
from glakeserve.vtensor import MapFuture, PagePool, VTensor


class KVLayout(str, Enum):
    TOKEN_MAJOR = "token-major"
    PER_LAYER = "per-layer"
    PAGED = "paged"  # the block-table baseline (kv_paged.py)


class KVCacheTooSmallError(ValueError):
    """The pool cannot hold even one request of max_model_len tokens."""


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


ANCHOR = "(anchor: padding for CUDA graphs)"


@dataclass
class Slot:
    index: int
    owner: str | None = None  # request id while a request runs in it
    mapped: int = 0  # pages mapped per vTensor (a prefix of the slot's range)
    target: int = 0  # pages mapped or queued for mapping per vTensor (>= mapped)
    futures: list[tuple[int, MapFuture]] = field(default_factory=list)  # (target reached, job)
    idle_since: float = 0.0
    shared: set[int] = field(default_factory=set)  # pages also mapped by the prefix cache: read-only


def aligned_host_page_size(bytes_per_token: int, target: int = 2 << 20, os_page: int = 4096) -> int:
    """The largest page no bigger than `target` that holds whole tokens and whole OS pages (the host
    backend maps OS pages); so the prefix cache can share pages. At least one such unit."""
    unit = bytes_per_token * os_page // math.gcd(bytes_per_token, os_page)  # lcm
    return max(unit, target // unit * unit)


class KVCache:
    def __init__(self, pool: PagePool, cfg: ModelConfig, dtype: torch.dtype, max_model_len: int,
                 num_slots: int, layout: KVLayout | str = KVLayout.TOKEN_MAJOR, lookahead_tokens: int = 64,
                 prefix_caching: bool = False, max_pages: int | None = None):
        self.pool = pool
        self.cfg = cfg
        self.dtype = dtype
        self.layout = KVLayout(layout)
        if self.layout is KVLayout.PAGED:
            raise ValueError("the paged layout is kv_paged.PagedKVCache")
        num_slots += 1  # slot 0 is the anchor (below); requests get slots 1..num_slots
        self.max_model_len = max_model_len
        self.num_slots = num_slots
        isz = dtype.itemsize
        L, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        ps = pool.page_size
        if self.layout is KVLayout.TOKEN_MAJOR:
            self.bytes_per_token = L * 2 * kvh * d * isz  # per vTensor (there is one)
            names = ["kv"]
        else:
            self.bytes_per_token = kvh * d * isz
            names = [f"L{i}.{kv}" for i in range(L) for kv in "KV"]
        self.slot_stride = round_up(max_model_len * self.bytes_per_token, ps)  # bytes, page aligned
        self.pages_per_slot = self.slot_stride // ps
        self.vtensors: list[VTensor] = [pool.reserve(num_slots * self.slot_stride, n) for n in names]
        # 64 tokens ahead: two pages (8 tokens for Llama-2-7B token-major) left the mapper behind on
        # the H100, 554 waits (RESULTS.md, Llama-2-7B re-run)
        self.lookahead_tokens = lookahead_tokens
        self.slots = [Slot(i) for i in range(num_slots)]
        self.block_table = None  # kernels address slots directly
        self._jobs: list[tuple[MapFuture, int]] = []  # map-ahead jobs and the pages each takes
        self.waits = 0
        self.reclaimed_pages = 0
        need = self.pages_for(max_model_len) * len(self.vtensors)
        total = pool.stats().total_pages
        if need > total:
            raise KVCacheTooSmallError(
                f"the KV cache pool has {total} pages ({total * ps / 2**20:.0f} MiB) but one request of "
                f"max_model_len={max_model_len} tokens needs {need} ({need * ps / 2**20:.0f} MiB, {self.layout.value} "
                f"layout): raise kv_cache_memory or lower max_model_len"
            )
        self._views = self._make_views()
        # elasticity: the pool may grow up to max_pages when short (and is shrunk by the engine when idle)
        self.max_pages = max(total, max_pages or total)
        self.min_pages = need + len(self.vtensors)  # one request of max_model_len, and the anchor
        # prefix caching shares whole pages, so a page must hold whole tokens: a token cut by a page
        # boundary would be rewritten through an alias when the prefix is extended
        self.prefix_disabled_reason = None
        if prefix_caching and ps % self.bytes_per_token:
            self.prefix_disabled_reason = (f"{ps}-byte pages do not hold whole {self.bytes_per_token}-byte tokens "
                                           f"({self.layout.value} layout); prefix caching needs them to")
        self.prefix = (PrefixCache(pool, self.vtensors, self.tokens_per_page(), self.max_pages // len(self.vtensors) + 1)
                       if prefix_caching and self.prefix_disabled_reason is None else None)
        # The anchor: slot 0 keeps one page mapped in every vTensor for the engine's whole life.
        # A view's base address is slot 0's first page, and Triton's launcher asks the driver about
        # it; it also serves as the slot that pads CUDA-graph batches.
        anchor = self.slots[0]
        anchor.owner = ANCHOR
        assert self.ensure(anchor, 1)


    # ----- geometry ---------------------------------------------------------------------------
    def _make_views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cfg, S, T = self.cfg, self.num_slots, self.max_model_len
        L, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        stride = self.slot_stride // self.dtype.itemsize  # elements between slots
        views = []
        if self.layout is KVLayout.TOKEN_MAJOR:
            tok = L * 2 * kvh * d
            for layer in range(L):
                k, v = (
                    self.vtensors[0].view(self.dtype, (S, T, kvh, d), (stride, tok, d, 1),
                                          offset=(layer * 2 + kv) * kvh * d * self.dtype.itemsize)
                    for kv in (0, 1)
                )
                views.append((k, v))
        else:
            for layer in range(L):
                k, v = (self.vtensors[2 * layer + kv].view(self.dtype, (S, T, kvh, d), (stride, kvh * d, d, 1))
                        for kv in (0, 1))
                views.append((k, v))
        return views

    def k_cache(self, layer: int) -> torch.Tensor:
        """[slots, max_model_len, kv_heads, head_dim], strided."""
        return self._views[layer][0]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._views[layer][1]

    def pages_for(self, tokens: int) -> int:
        """Pages per vTensor that `tokens` tokens of one slot occupy."""
        return -(-tokens * self.bytes_per_token // self.pool.page_size)

    def tokens_per_page(self) -> int:
        return self.pool.page_size // self.bytes_per_token

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return self.bytes_per_token * len(self.vtensors)

    def reserved_pages_per_slot(self) -> int:
        return self.pages_per_slot * len(self.vtensors)

    def _ranges(self, slot: Slot, start: int, stop: int) -> list[tuple[VTensor, int, int]]:
        first = slot.index * self.pages_per_slot + start
        return [(vt, first, stop - start) for vt in self.vtensors]

    # ----- slots ------------------------------------------------------------------------------
    def acquire_slot(self, owner: str, tokens: int) -> Slot | None:
        """An idle slot for a new request: the one whose mapped pages fit `tokens` best (fewest
        spare pages among those that hold them all, else the one holding the most). None if every
        slot is taken."""
        idle = [s for s in self.slots[1:] if s.owner is None]
        if not idle:
            return None
        need = self.pages_for(tokens)
        fitting = [s for s in idle if s.target >= need]
        best = min(fitting, key=lambda s: (s.target, s.index)) if fitting else max(idle, key=lambda s: (s.target, -s.index))
        best.owner = owner
        return best

    def padding_slot(self) -> Slot:
        """The slot CUDA graphs point their padding rows at: one page mapped, never a request's."""
        return self.slots[0]

    def flush(self) -> None:
        """Nothing to publish before a step: kernels read slots, not tables."""

    def release_slot(self, slot: Slot, keep_pages: bool) -> None:
        """The owner is done. Deferred reclamation: with keep_pages the pages stay mapped for the next
        request to reuse, and are unmapped only when the pool runs short."""
        slot.owner = None
        slot.idle_since = time.monotonic()
        if not keep_pages:
            self._unmap_all(slot)

    def _unmap_all(self, slot: Slot) -> None:
        self._truncate(slot, 0)

    def _truncate(self, slot: Slot, pages: int) -> None:
        """Unmaps the slot's pages from `pages` on (shared ones only lose this mapping)."""
        self._wait(slot, slot.target)
        if slot.mapped > pages:
            self.pool.unmap_batch(self._ranges(slot, pages, slot.mapped))
        slot.mapped = slot.target = min(slot.mapped, pages)
        slot.shared = {p for p in slot.shared if p < pages}

    # ----- mapping ----------------------------------------------------------------------------
    def _free_pages(self) -> int:
        return self.pool.free_pages()

    def free_pages(self) -> int:
        return self.pool.free_pages()

    def pool_stats(self) -> dict:
        return self.pool.stats().__dict__

    def snapshot(self) -> dict:
        return self.pool.snapshot()

    def _available_pages(self) -> int:
        """Free pages that no queued job will take. Queued pages are counted before free ones are
        read, so a job finishing in between is subtracted twice (safe) rather than not at all."""
        self._jobs = [(f, n) for f, n in self._jobs if not f.done()]
        queued = sum(n for _, n in self._jobs)
        return self._free_pages() - queued

    def _drain(self) -> None:
        """Waits for every queued job: afterwards the pool's free count is exact."""
        for slot in self.slots:
            self._wait(slot, slot.target)
        self._jobs.clear()

    def _reclaim(self, pages_needed: int, keep: Slot | None = None) -> None:
        """Frees pages until `pages_needed` are free: idle slots' pages (longest idle first), then
        prefix-cache entries (least recently used first), then new physical pages up to max_pages."""
        for slot in sorted((s for s in self.slots if s.owner is None and s.target and s is not keep),
                           key=lambda s: s.idle_since):
            if self._free_pages() >= pages_needed:
                return
            self.reclaimed_pages += slot.target * len(self.vtensors)
            self._unmap_all(slot)
        while self.prefix is not None and self._free_pages() < pages_needed:
            # a batch of the oldest entries at a time (an entry frees a page only if no slot maps it)
            if not self.prefix.evict_lru(max(1, (pages_needed - self._free_pages()) // len(self.vtensors))):
                break
        short = pages_needed - self._free_pages()
        if short > 0:
            total = self.pool.stats().total_pages
            grow = min(self.max_pages - total, max(short, 64))
            if grow > 0:
                self.pool.grow(grow)

    def ensure(self, slot: Slot, tokens: int) -> bool:
        """Makes the slot's pages cover `tokens` tokens before a step reads or writes them: waits for
        the worker where pages were queued, maps the rest now. False when the pool cannot supply
        them even after reclaiming idle slots (the scheduler then preempts)."""
        need = self.pages_for(tokens)
        if need > self.pages_per_slot:
            raise ValueError(f"{tokens} tokens exceed max_model_len={self.max_model_len}")
        if need > slot.target:
            extra = (need - slot.target) * len(self.vtensors)
            self._drain()  # a synchronous map waits for queued jobs on its vTensors anyway
            if self._free_pages() < extra:
                self._reclaim(extra, keep=slot)
                if self._free_pages() < extra:
                    return False
            self.pool.map_batch(self._ranges(slot, slot.target, need))
            slot.mapped = slot.target = need
        self._wait(slot, need)
        return True

    def map_ahead(self, wanted: list[tuple[Slot, int]]) -> None:
        """Queues, as one job on the worker, the pages that each (slot, tokens) will need, as far as
        free pages allow, so that later steps find them mapped. Never reclaims or waits."""
        free = self._available_pages()
        ranges, slots = [], []
        for slot, tokens in wanted:
            need = min(self.pages_for(tokens), self.pages_per_slot)
            extra = (need - slot.target) * len(self.vtensors)
            if need <= slot.target or extra > free:
                continue
            free -= extra
            ranges += self._ranges(slot, slot.target, need)
            slots.append((slot, need))
        if not ranges:
            return
        future = self.pool.map_async(ranges)
        self._jobs.append((future, sum(n for _, _, n in ranges)))
        for slot, need in slots:
            slot.futures.append((need, future))
            slot.target = need

    def _wait(self, slot: Slot, pages: int) -> None:
        """Waits for the queued jobs that bring the slot to `pages` mapped pages."""
        while slot.futures and slot.mapped < pages:
            reached, future = slot.futures.pop(0)
            if not future.done():
                self.waits += 1
            future.wait()
            slot.mapped = reached

    def poll(self) -> None:
        """Takes note of jobs the worker finished, without waiting."""
        for slot in self.slots:
            while slot.futures and slot.futures[0][1].done():
                reached, future = slot.futures.pop(0)
                future.wait()  # raises the job's error, if any
                slot.mapped = reached

    # ----- prefix caching ---------------------------------------------------------------------
    def attach_prefix(self, slot: Slot, req) -> int:
        """Gives a newly admitted request the KV the cache holds for its first tokens: full pages
        aliased at the same offsets, then (copy-on-write) the page where the match ends copied into a
        private page. Returns how many tokens need no computing. At least one token is always left
        to compute, and no page the request will write to stays shared."""
        if self.prefix is None:
            return 0
        T = self.tokens_per_page()
        ids = req.all_token_ids
        full, partial, j = self.prefix.match(ids, req.num_tokens - 1)
        k = len(full)
        self._wait(slot, slot.target)
        # the reused slot's own shared pages past the match would be written to: drop them and all
        # after (ensure() maps fresh ones), so that the mapped pages stay a prefix
        stale = [p for p in slot.shared if p >= k]
        if stale:
            self._truncate(slot, min(stale))
        if k:
            self._truncate_front(slot, k)
            self.prefix.alias_into(full, slot.index * self.pages_per_slot)
            slot.shared |= set(range(k))
            slot.mapped = slot.target = max(slot.mapped, k)
        if partial is not None and j:
            # page k needs a private page to copy into. No reclaiming for it here: that could evict
            # the very entry about to be copied; without a free page the tokens are recomputed instead
            if slot.mapped <= k:  # free pages a queued map-ahead job will take are not free
                if self._available_pages() >= len(self.vtensors):
                    self.pool.map_batch(self._ranges(slot, k, k + 1))
                    slot.mapped = slot.target = k + 1
            if slot.mapped > k:
                self.prefix.copy_into(partial, slot.index * self.pages_per_slot + k)
            else:
                j = 0
        req.block_keys = [e.key for e in full]
        req.indexed_pages = k
        self.prefix.hit_tokens += k * T + j
        return k * T + j

    def _truncate_front(self, slot: Slot, k: int) -> None:
        """Unmaps the slot's pages [0, k) that are mapped, to make room for aliases."""
        n = min(k, slot.mapped)
        if n:
            self.pool.unmap_batch(self._ranges(slot, 0, n))
        slot.shared -= set(range(n))

    def index_request(self, req, upto_tokens: int, finished: bool = False) -> None:
        """Puts the request's complete pages among its first `upto_tokens` tokens into the prefix
        cache (a page somebody else already put there replaces the request's own copy: one physical
        page then serves both). At finish, its partly filled last page too, for copying."""
        if self.prefix is None or req.slot is None:
            return
        T = self.tokens_per_page()
        ids = req.all_token_ids
        done = upto_tokens // T
        slot = req.slot
        base = slot.index * self.pages_per_slot
        if done > req.indexed_pages:
            keys = self.prefix.keys(ids, done, req.block_keys)
            for b in range(req.indexed_pages, done):
                parent = keys[b - 1] if b else ROOT
                tokens = tuple(ids[b * T:(b + 1) * T])
                entry = self.prefix.entries.get(keys[b])
                if entry is None:
                    if self.prefix.insert(keys[b], parent, tokens, base + b, partial=False):
                        slot.shared.add(b)
                elif (entry.tokens == tokens and entry.parent == parent and b not in slot.shared
                      and entry.partial_len is None):
                    self.pool.unmap_batch(self._ranges(slot, b, b + 1))
                    self.prefix.alias_into([entry], base + b)  # same bytes, one physical page fewer
                    slot.shared.add(b)
                    self.prefix.touch(entry)
            req.indexed_pages = done
        tail = upto_tokens - done * T
        if finished and tail and done not in slot.shared:
            parent = req.block_keys[done - 1] if done else ROOT
            tokens = tuple(ids[done * T:upto_tokens])
            key = hash(("partial", parent, tokens))
            if key not in self.prefix.entries and self.prefix.insert(key, parent, tokens, base + done, partial=True):
                slot.shared.add(done)

    # ----- inspection -------------------------------------------------------------------------
    def slot_stats(self, tokens: dict[int, int]) -> list[dict]:
        """Per slot: owner, tokens held, pages mapped / queued / reserved (over all its vTensors)."""
        n = len(self.vtensors)
        return [
            {
                "slot": s.index,
                "owner": s.owner,
                "internal": s.owner == ANCHOR,
                "tokens": tokens.get(s.index, 0),
                "mapped_pages": s.mapped * n,
                "queued_pages": (s.target - s.mapped) * n,
                "shared_pages": len(s.shared) * n,
                "reserved_pages": self.pages_per_slot * n,
                "waste_bytes": max(0, s.mapped * self.pool.page_size - tokens.get(s.index, 0) * self.bytes_per_token) * n,
            }
            for s in self.slots
        ]

    def check_integrity(self, tokens: dict[int, int]) -> None:
        """Raises AssertionError unless: the pool's books balance; each slot's mapped pages (as the
        allocator sees them) are exactly its prefix and cover the tokens it holds; no page is mapped
        twice unless aliased (no aliasing here yet, so never)."""
        self.poll()
        self.pool.check_integrity()
        snap = self.pool.snapshot()  # one consistent view; the worker may map on meanwhile
        if self.prefix is not None:
            self.prefix.check_integrity(snap)
        else:
            assert snap["pool"]["shared_pages"] == 0, snap["pool"]
        mapped_by_vt = {v["id"]: set(v["mapped_pages"]) for v in snap["vtensors"]}
        expected = {vt.id: set() for vt in self.vtensors}
        for slot in self.slots:
            assert slot.mapped <= slot.target <= self.pages_per_slot, slot
            assert all(p < slot.mapped for p in slot.shared), slot
            held = tokens.get(slot.index, 0)
            assert slot.mapped >= self.pages_for(held), (slot, held)
            if held:
                assert slot.owner is not None, slot
            base = slot.index * self.pages_per_slot
            for vt in self.vtensors:
                expected[vt.id].update(range(base, base + slot.mapped))
        for vt in self.vtensors:
            mapped = mapped_by_vt[vt.id]
            assert expected[vt.id] <= mapped, (vt.name, sorted(expected[vt.id] - mapped)[:8])
            # pages past a slot's `mapped` can only be ones the worker mapped since the last poll
            for page in mapped - expected[vt.id]:
                slot = self.slots[page // self.pages_per_slot]
                assert page % self.pages_per_slot < slot.target, (vt.name, page)

    def prefix_stats(self) -> dict | None:
        return None if self.prefix is None else self.prefix.stats()

    def close(self) -> None:
        for slot in self.slots:
            self._wait(slot, slot.target)
        for vt in self.vtensors + (self.prefix.vtensors if self.prefix else []):
            vt.release()
