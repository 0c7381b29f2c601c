"""Prefix caching by page aliasing: requests share KV pages without copying them.

Every complete page a request computes is mapped a second time into the cache's own vTensor(s)
("inserted"), keyed by a hash chain over page-sized runs of tokens:

    key(page b) = hash(key(page b - 1), tokens[b * T : (b + 1) * T])        T = tokens a page holds

A new request whose tokens start with cached pages gets those physical pages mapped into its slot at
the same offsets ("aliased") and prefills only the rest. The page where the shared prefix ends is
copied into a private page (copy-on-write): nobody ever writes through an alias, so every other
holder's KV stays intact. A finished request's partly filled last page is kept too, for copying
(multi-turn chat: turn N+1's prompt starts with turn N's whole conversation).

Pages are freed by the allocator's refcounts: evicting an entry (least recently used first, with the
entries that extend it) unmaps the cache's mapping, and the physical page returns to the pool only
when no slot maps it either. Kernels never notice: a slot is still one contiguous range.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from glakeserve.vtensor import PagePool, VTensor

ROOT = 0  # the parent key of every request's first page


@dataclass
class CacheEntry:
    key: int
    parent: int
    tokens: tuple[int, ...]  # what the page holds; fewer than T for a partial page
    page: int  # its page in the cache's vTensor(s)
    last_used: float = field(default_factory=time.monotonic)
    partial_len: int | None = None  # tokens held, for a partly filled page (only ever copied)


def block_key(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens)) or 1  # never ROOT


class PrefixCache:
    def __init__(self, pool: PagePool, kv_vtensors: list[VTensor], tokens_per_page: int, capacity: int):
        self.pool = pool
        self.kv_vtensors = kv_vtensors
        self.tokens_per_page = tokens_per_page
        self.page_size = pool.page_size
        # one cache vTensor beside each KV vTensor: entry e lives at page e.page of every one of them
        self.vtensors = [pool.reserve(capacity * self.page_size, f"prefix-cache.{vt.name}") for vt in kv_vtensors]
        self.capacity = capacity
        self.entries: OrderedDict[int, CacheEntry] = OrderedDict()  # least recently used first
        self.children: dict[int, set[int]] = {}  # parent key -> keys of entries that extend it
        self.free = list(range(capacity - 1, -1, -1))
        self.copy_pending = False  # a copy_into may still be queued on the GPU
        self.reset_counters()

    def reset_counters(self) -> None:
        self.hit_tokens = self.lookups = self.inserted = self.evicted = 0

    # ----- keys -------------------------------------------------------------------------------
    def keys(self, token_ids: list[int], pages: int, known: list[int]) -> list[int]:
        """The chain keys of the first `pages` full pages, extending the `known` ones (a request
        keeps its own list so each page is hashed once)."""
        T = self.tokens_per_page
        keys = known
        parent = keys[-1] if keys else ROOT
        for b in range(len(keys), pages):
            parent = block_key(parent, tuple(token_ids[b * T:(b + 1) * T]))
            keys.append(parent)
        return keys

    # ----- lookup -----------------------------------------------------------------------------
    def match(self, token_ids: list[int], limit: int) -> tuple[list[CacheEntry], CacheEntry | None, int]:
        """(full entries that hold token_ids' first pages, an entry whose page starts with the
        tokens after them, how many of those tokens it holds), covering at most `limit` tokens."""
        T = self.tokens_per_page
        self.lookups += 1
        full: list[CacheEntry] = []
        parent = ROOT
        while (len(full) + 1) * T <= limit:
            tokens = tuple(token_ids[len(full) * T:(len(full) + 1) * T])
            entry = self.entries.get(block_key(parent, tokens))
            # the key is a hash: check what it stands for. The parent check makes the whole chain
            # checked (by induction), so a collision can cost a miss but never serve wrong KV
            if entry is None or entry.partial_len is not None or entry.tokens != tokens or entry.parent != parent:
                break
            full.append(entry)
            parent = entry.key
        rest = token_ids[len(full) * T: min(limit, (len(full) + 1) * T)]
        best, best_len = None, 0
        for key in self.children.get(parent, ()):
            entry = self.entries[key]
            n = 0
            for a, b in zip(entry.tokens, rest):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = entry, n
        now = time.monotonic()
        for e in full + ([best] if best else []):
            e.last_used = now
            self.entries.move_to_end(e.key)
        return full, best, best_len

    # ----- insertion --------------------------------------------------------------------------
    def insert(self, key: int, parent: int, tokens: tuple[int, ...], slot_first_page: int, partial: bool) -> bool:
        """Maps the slot's page (at slot_first_page of each KV vTensor) into the cache under key.
        False when the cache is full."""
        if not self.free:
            return False
        page = self.free.pop()
        self.pool.alias_batch([(c, page, k, slot_first_page, 1) for c, k in zip(self.vtensors, self.kv_vtensors)])
        self.entries[key] = CacheEntry(key, parent, tokens, page, partial_len=len(tokens) if partial else None)
        self.children.setdefault(parent, set()).add(key)
        self.inserted += 1
        return True

    def alias_into(self, entries: list[CacheEntry], slot_first_page: int) -> None:
        """Maps the entries' pages into a slot: entry i at the slot's page i."""
        self.pool.alias_batch([(k, slot_first_page + i, c, e.page, 1)
                               for i, e in enumerate(entries) for c, k in zip(self.vtensors, self.kv_vtensors)])

    def copy_into(self, entry: CacheEntry, slot_page: int) -> None:
        """Copies an entry's page into a (mapped, private) page of a slot: copy-on-write."""
        ps = self.page_size
        for c, k in zip(self.vtensors, self.kv_vtensors):
            dst = k.view(torch.uint8, (ps,), offset=slot_page * ps)
            dst.copy_(c.view(torch.uint8, (ps,), offset=entry.page * ps))
            self.copy_pending |= dst.is_cuda  # queued on the stream: its source must stay mapped until it runs

    # ----- eviction ---------------------------------------------------------------------------
    def touch(self, entry: CacheEntry) -> None:
        entry.last_used = time.monotonic()
        self.entries.move_to_end(entry.key)

    def evict_lru(self, count: int = 1) -> int:
        """Evicts the `count` least recently used entries and every entry that extends them, with
        one unmap call; returns how many cache pages were unmapped (0 when the cache is empty)."""
        doomed: dict[int, CacheEntry] = {}
        for key in list(self.entries)[:count]:  # OrderedDict: the oldest first
            stack = [key]
            while stack:
                k = stack.pop()
                if k not in doomed:
                    doomed[k] = self.entries[k]
                    stack.extend(self.children.get(k, ()))
        if not doomed:
            return 0
        if self.copy_pending:  # a copy-on-write queued on the GPU may still read one of these pages
            torch.cuda.current_stream().synchronize()
            self.copy_pending = False
        self.pool.unmap_batch([(c, e.page, 1) for e in doomed.values() for c in self.vtensors])
        for e in doomed.values():
            del self.entries[e.key]
            self.children.get(e.parent, set()).discard(e.key)
            self.children.pop(e.key, None)
            self.free.append(e.page)
        self.evicted += len(doomed)
        return len(doomed) * len(self.vtensors)

    def clear(self) -> None:
        self.evict_lru(len(self.entries))

    # ----- inspection -------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"entries": len(self.entries), "cached_pages": len(self.entries) * len(self.vtensors),
                "hit_tokens": self.hit_tokens, "lookups": self.lookups, "inserted": self.inserted,
                "evicted": self.evicted, "tokens_per_page": self.tokens_per_page}

    def check_integrity(self, snapshot: dict) -> None:
        """Each entry's page is mapped in every cache vTensor, and nothing else is."""
        mapped = {v["id"]: set(v["mapped_pages"]) for v in snapshot["vtensors"]}
        pages = {e.page for e in self.entries.values()}
        assert len(pages) == len(self.entries), "two entries share a cache page"
        assert not pages & set(self.free), "a cache page is both used and free"
        for c in self.vtensors:
            assert mapped[c.id] == pages, (c.name, sorted(mapped[c.id] ^ pages)[:8])
        for parent, kids in self.children.items():
            for key in kids:
                assert self.entries[key].parent == parent
