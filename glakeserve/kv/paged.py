"""The paged baseline (`--kv-layout paged`): PagedAttention's design, kept to be measured against.
Each layer's K and V live in ordinary preallocated tensors of fixed-size blocks [num_blocks, 16,
kv_heads, dim]; a request owns a row of a block table that lists its blocks, and kernels look every
token up through it. A fixed pool, no prefix caching: a finished request's blocks are free at once.
"""

from __future__ import annotations

import time

import torch

from glakeserve.kv.base import ANCHOR, KVCache, KVCacheTooSmallError, KVLayout, KVStats, Slot
from glakeserve.model.config import ModelConfig

BLOCK_TOKENS = 16


class PagedKVCache(KVCache):
    layout = KVLayout.PAGED

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int, num_slots: int,
                 memory_bytes: int):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.max_model_len = max_model_len
        L, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.block_bytes = 2 * L * BLOCK_TOKENS * kvh * d * dtype.itemsize  # K and V of every layer
        self.num_blocks = memory_bytes // self.block_bytes
        self.blocks_per_row = -(-max_model_len // BLOCK_TOKENS)
        if self.num_blocks < self.blocks_per_row + 1:
            raise KVCacheTooSmallError(
                f"the paged KV cache has {self.num_blocks} blocks but one request of max_model_len={max_model_len} "
                f"tokens needs {self.blocks_per_row} besides the padding row: raise kv_cache_memory or lower "
                f"max_model_len")
        shape = (self.num_blocks, BLOCK_TOKENS, kvh, d)
        self._caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                        for _ in range(L)]
        self.num_slots = num_slots + 1  # row 0 pads CUDA-graph batches
        pin = device.type == "cuda"
        self._table_host = torch.zeros(self.num_slots, self.blocks_per_row, dtype=torch.int32, pin_memory=pin)
        self.block_table = self._table_host.to(device) if pin else self._table_host
        self._dirty: set[int] = set()
        self.slots = [Slot(i) for i in range(self.num_slots)]
        self._free_rows = list(range(self.num_slots - 1, 0, -1))
        self._blocks: list[list[int]] = [[] for _ in range(self.num_slots)]
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.blocks_handed_out = 0
        self.slots[0].owner = ANCHOR
        self._grow(0, 1)

    # ----- geometry ---------------------------------------------------------------------------
    def k_cache(self, layer: int) -> torch.Tensor:
        return self._caches[layer][0]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._caches[layer][1]

    def tokens_per_block(self) -> int:
        return BLOCK_TOKENS

    def kv_bytes_per_token(self) -> int:
        return self.block_bytes // BLOCK_TOKENS

    # ----- slots ------------------------------------------------------------------------------
    def admit(self, req) -> bool:
        if not self._free_rows:
            return False
        slot = self.slots[self._free_rows.pop()]
        slot.owner = req.request_id
        req.slot = slot
        req.num_computed_tokens = 0
        return True

    def _grow(self, row: int, need: int) -> bool:
        have = self._blocks[row]
        extra = need - len(have)
        if extra <= 0:
            return True
        if extra > len(self._free):
            return False
        new = [self._free.pop() for _ in range(extra)]
        self._table_host[row, len(have):need] = torch.tensor(new, dtype=torch.int32)
        have += new
        self._dirty.add(row)
        self.blocks_handed_out += extra
        return True

    def reserve(self, req, tokens: int) -> bool:
        need = self.blocks_for(tokens)
        if need > self.blocks_per_row:
            raise ValueError(f"{tokens} tokens exceed max_model_len={self.max_model_len}")
        return self._grow(req.slot.index, need)

    def release(self, req) -> None:
        slot = req.slot
        slot.owner = None
        self._free.extend(reversed(self._blocks[slot.index]))
        self._blocks[slot.index] = []
        self._free_rows.append(slot.index)
        req.slot = None

    # ----- a step -----------------------------------------------------------------------------
    def begin_step(self, batch) -> None:
        """Copies the block-table rows that changed to the device before the kernels read them."""
        if self.block_table is not self._table_host:
            for row in self._dirty:
                self.block_table[row].copy_(self._table_host[row], non_blocking=True)
        self._dirty.clear()

    def end_step(self, batch, event: torch.cuda.Event | None) -> None:
        """Blocks are plain indices handed out when reserved: nothing to map ahead or index."""

    # ----- the pool's life --------------------------------------------------------------------
    def set_limit(self, max_bytes: int) -> dict:
        raise ValueError("the paged baseline has a fixed pool; the limit applies to vTensor layouts")

    def release_idle(self) -> int:
        """The baseline's pool is fixed tensors: there is nothing to give back while it lives."""
        return 0

    def drop_cached(self) -> None:
        """The baseline keeps no KV after a request (its blocks are free at once)."""

    # ----- inspection -------------------------------------------------------------------------
    def stats(self) -> KVStats:
        used = self.num_blocks - len(self._free) - len(self._blocks[0])
        held = self.num_blocks - len(self._free)
        pool = {  # the allocator's counters, as far as a table of preallocated blocks has them
            "backend": "paged", "device": self.device.index or 0, "page_size": self.block_bytes,
            "total_pages": self.num_blocks, "free_pages": len(self._free), "used_pages": held, "shared_pages": 0,
            "mappings": held, "num_vtensors": 0, "reserved_bytes": self.num_blocks * self.block_bytes,
            "pages_mapped": self.blocks_handed_out, "pages_unmapped": 0, "pages_aliased": 0, "set_access_calls": 0,
            "pages_created": self.num_blocks, "pages_released": 0, "sync_driver_calls": 0, "async_jobs": 0,
            "async_pages": 0, "waits": 0, "wait_seconds": 0.0, "map_seconds": 0.0, "set_access_seconds": 0.0,
            "unmap_seconds": 0.0}
        return KVStats(layout="paged", page_size=self.block_bytes, pages_per_block=1, tokens_per_block=BLOCK_TOKENS,
                       total_pages=self.num_blocks, free_pages=len(self._free), request_pages=used, cached_pages=0,
                       max_pages=self.num_blocks, mapping_waits=0, engine_driver_calls=0, reclaimed_pages=0, pool=pool,
                       prefix=None, prefix_disabled_reason="the paged baseline has no prefix caching")

    def slot_stats(self, tokens: dict[int, int]) -> list[dict]:
        return [
            {"slot": s.index, "owner": s.owner, "internal": s.owner == ANCHOR, "tokens": tokens.get(s.index, 0),
             "mapped_pages": len(self._blocks[s.index]), "queued_pages": 0, "shared_pages": 0,
             "reserved_pages": self.blocks_per_row,
             "waste_bytes": max(0, len(self._blocks[s.index]) * BLOCK_TOKENS - tokens.get(s.index, 0))
             * self.kv_bytes_per_token()}
            for s in self.slots
        ]

    def snapshot(self) -> dict:
        return {"pool": self.stats().pool, "vtensors": [], "refcounts": []}

    def check_integrity(self, tokens: dict[int, int]) -> None:
        owned = [b for blocks in self._blocks for b in blocks]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert not set(owned) & set(self._free), "a block is both owned and free"
        assert len(owned) + len(self._free) == self.num_blocks
        for s in self.slots:
            blocks = self._blocks[s.index]
            assert len(blocks) >= self.blocks_for(tokens.get(s.index, 0)), (s, tokens.get(s.index))
            assert self._table_host[s.index, :len(blocks)].tolist() == blocks
            assert (s.owner is None) == (s.index in self._free_rows), s

    def close(self) -> None:
        self._caches = []
