"""Prefix caching by ownership: the rules in one place (keys, validation, counters, eviction order).

A slot keeps its KV after its request is done. The index says where full blocks of known token runs
already sit; it points into slots, so putting a block in the cache costs nothing:

    key(block b) = hash(key(block b - 1), tokens[b * T : (b + 1) * T])      T = tokens a block holds

    entry(key) = (parent key, the T tokens, block b, holders = the slots whose block b holds it)

A block's KV depends on every token before it, and the key chains them, so an entry at block b is
the same bytes in every holder, at the same offset b. A new request whose first blocks are indexed
either takes an idle holder's slot itself (nothing moves: a chat's next turn) or gets the blocks
mapped into its own slot as aliases of a holder's physical pages. Keys are hashes: each lookup checks
tokens and parent too, so a collision costs a miss, never another prefix's KV.

Eviction is reclamation: idle slots give their pages back least recently used first, and an entry
goes when its last holder lets the block go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROOT = 0  # the parent key of every request's first block


def block_key(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens)) or 1  # never ROOT


@dataclass
class Entry:
    key: int
    parent: int
    tokens: tuple[int, ...]
    block: int  # its index in every holder's slot
    holders: set[int] = field(default_factory=set)  # slot indices


@dataclass(frozen=True)
class PrefixStats:
    entries: int  # distinct blocks the index knows
    lookups: int  # admissions that looked
    hits: int  # ... that reused at least one block
    hit_tokens: int  # prompt tokens not computed thanks to the cache
    slot_reuses: int  # hits served in the holder's own slot (no driver call)
    aliased_blocks: int  # blocks mapped into another slot as aliases
    evicted_blocks: int  # blocks the index lost when holders gave them up for other requests
    tokens_per_block: int


class PrefixIndex:
    def __init__(self, tokens_per_block: int):
        self.tokens_per_block = tokens_per_block
        self.entries: dict[int, Entry] = {}
        self.lookups = self.hits = self.hit_tokens = self.slot_reuses = self.aliased_blocks = self.evicted = 0

    # ----- keys -------------------------------------------------------------------------------
    def extend_keys(self, keys: list[int], token_ids: list[int], blocks: int) -> list[int]:
        """Appends to `keys` the chain keys of token_ids' full blocks up to `blocks` (a slot keeps its
        list, so each block is hashed once)."""
        T = self.tokens_per_block
        parent = keys[-1] if keys else ROOT
        for b in range(len(keys), blocks):
            parent = block_key(parent, tuple(token_ids[b * T:(b + 1) * T]))
            keys.append(parent)
        return keys

    # ----- lookup -----------------------------------------------------------------------------
    def match(self, token_ids: list[int], limit: int, count: bool = True) -> list[Entry]:
        """The entries holding token_ids' first full blocks, covering at most `limit` tokens. Each
        entry's tokens and parent are checked against the request: by induction, the whole chain.
        count=False: a look that is not an admission (not counted as a lookup)."""
        T = self.tokens_per_block
        self.lookups += count
        found: list[Entry] = []
        parent = ROOT
        while (len(found) + 1) * T <= limit:
            b = len(found)
            tokens = tuple(token_ids[b * T:(b + 1) * T])
            entry = self.entries.get(block_key(parent, tokens))
            if entry is None or entry.tokens != tokens or entry.parent != parent or entry.block != b:
                break
            found.append(entry)
            parent = entry.key
        return found

    def count_hit(self, tokens: int, in_own_slot: bool, aliased_blocks: int) -> None:
        if tokens:
            self.hits += 1
            self.hit_tokens += tokens
            self.slot_reuses += in_own_slot
            self.aliased_blocks += aliased_blocks

    # ----- holders ----------------------------------------------------------------------------
    def add(self, slot: int, keys: list[int], token_ids: list[int], first: int, stop: int) -> None:
        """The slot's blocks [first, stop) hold token_ids' blocks with these chain keys."""
        T = self.tokens_per_block
        for b in range(first, stop):
            key = keys[b]
            entry = self.entries.get(key)
            if entry is None:
                tokens = tuple(token_ids[b * T:(b + 1) * T])
                entry = self.entries[key] = Entry(key, keys[b - 1] if b else ROOT, tokens, b)
            elif entry.block != b or entry.tokens != tuple(token_ids[b * T:(b + 1) * T]) or entry.parent != (
                    keys[b - 1] if b else ROOT):
                continue  # a hash collision: another run of tokens owns the key; this block stays unindexed
            entry.holders.add(slot)

    def remove(self, slot: int, keys: list[int], first: int) -> None:
        """The slot no longer holds its blocks from `first` on; entries without holders go."""
        for b in range(first, len(keys)):
            entry = self.entries.get(keys[b])
            if entry is None or slot not in entry.holders:
                continue
            entry.holders.discard(slot)
            if not entry.holders:
                del self.entries[keys[b]]
                self.evicted += 1
        del keys[first:]

    def clear(self) -> None:
        self.entries.clear()

    def stats(self) -> PrefixStats:
        return PrefixStats(entries=len(self.entries), lookups=self.lookups, hits=self.hits,
                           hit_tokens=self.hit_tokens, slot_reuses=self.slot_reuses,
                           aliased_blocks=self.aliased_blocks, evicted_blocks=self.evicted,
                           tokens_per_block=self.tokens_per_block)

    def reset_counters(self) -> None:
        self.lookups = self.hits = self.hit_tokens = self.slot_reuses = self.aliased_blocks = self.evicted = 0

    def check_integrity(self, slot_keys: dict[int, list[int]]) -> None:
        """Every entry's holders list it at its block; every key a slot lists is indexed with it."""
        for key, entry in self.entries.items():
            assert entry.key == key and entry.holders, entry
            for s in entry.holders:
                keys = slot_keys[s]
                assert entry.block < len(keys) and keys[entry.block] == key, (s, entry.block)
        for s, keys in slot_keys.items():
            for b, key in enumerate(keys):
                entry = self.entries.get(key)
                assert entry is not None and (s in entry.holders or entry.block != b), (s, b)


def eviction_order(idle: dict[int, float]) -> list[int]:
    """Idle slots, the one whose KV was used longest ago first: what reclamation takes first."""
    return sorted(idle, key=idle.__getitem__)
