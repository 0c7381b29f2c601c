"""The paged baseline (`--kv-layout paged`): PagedAttention's design, kept only to be measured
against. Each layer's K and V live in ordinary preallocated tensors of fixed-size blocks
[num_blocks, 16, kv_heads, dim]; a request owns a row of a block table that lists its blocks, and
kernels look every token up through it. Same interface as kv_cache.KVCache, so the scheduler and the
engine run unchanged on either.
"""

from __future__ import annotations

import time

import torch

from glakeserve.kv_cache import ANCHOR, KVCacheTooSmallError, Slot
from glakeserve.model.config import ModelConfig

BLOCK_TOKENS = 16


class PagedKVCache:
    layout_name = "paged"

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int, num_slots: int,
                 memory_bytes: int, lookahead_tokens: int = 0):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.max_model_len = max_model_len
        self.lookahead_tokens = lookahead_tokens
        L, kvh, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        self.block_bytes = 2 * L * BLOCK_TOKENS * kvh * d * dtype.itemsize  # K and V of every layer
        self.num_blocks = memory_bytes // self.block_bytes
        self.blocks_per_row = -(-max_model_len // BLOCK_TOKENS)
        if self.num_blocks < self.blocks_per_row:
            raise KVCacheTooSmallError(
                f"the paged KV cache has {self.num_blocks} blocks but one request of max_model_len={max_model_len} "
                f"tokens needs {self.blocks_per_row}: raise kv_cache_memory or lower max_model_len")
        shape = (self.num_blocks, BLOCK_TOKENS, kvh, d)
        self._caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                        for _ in range(L)]
        self.num_slots = num_slots + 1  # row 0 pads CUDA-graph batches (as kv_cache.KVCache's slot 0)
        pin = device.type == "cuda"
        self._table_host = torch.zeros(self.num_slots, self.blocks_per_row, dtype=torch.int32, pin_memory=pin)
        self.block_table = self._table_host.to(device) if pin else self._table_host
        self._dirty: set[int] = set()
        self.slots = [Slot(i) for i in range(self.num_slots)]
        self._blocks: list[list[int]] = [[] for _ in range(self.num_slots)]
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.waits = 0
        self.reclaimed_pages = 0
        self.pages_mapped = 0
        self.slots[0].owner = ANCHOR
        assert self.ensure(self.slots[0], 1)

    # ----- the KV interface -------------------------------------------------------------------
    @property
    def layout(self):
        from glakeserve.kv_cache import KVLayout

        return KVLayout.PAGED

    def k_cache(self, layer: int) -> torch.Tensor:
        return self._caches[layer][0]

    def v_cache(self, layer: int) -> torch.Tensor:
        return self._caches[layer][1]

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // BLOCK_TOKENS)

    def tokens_per_page(self) -> int:
        return BLOCK_TOKENS

    def kv_bytes_per_token(self) -> int:
        return self.block_bytes // BLOCK_TOKENS

    def reserved_pages_per_slot(self) -> int:
        return self.blocks_per_row

    def acquire_slot(self, owner: str, tokens: int) -> Slot | None:
        for s in self.slots[1:]:
            if s.owner is None:
                s.owner = owner
                return s
        return None

    def padding_slot(self) -> Slot:
        return self.slots[0]

    def release_slot(self, slot: Slot, keep_pages: bool) -> None:
        # the baseline frees a finished request's blocks at once (no reuse across requests)
        slot.owner = None
        slot.idle_since = time.monotonic()
        self._free.extend(reversed(self._blocks[slot.index]))
        self._blocks[slot.index] = []
        slot.mapped = slot.target = 0

    def ensure(self, slot: Slot, tokens: int) -> bool:
        need = self.pages_for(tokens)
        if need > self.blocks_per_row:
            raise ValueError(f"{tokens} tokens exceed max_model_len={self.max_model_len}")
        have = self._blocks[slot.index]
        if need > len(have):
            extra = need - len(have)
            if extra > len(self._free):
                return False
            new = [self._free.pop() for _ in range(extra)]
            self._table_host[slot.index, len(have):need] = torch.tensor(new, dtype=torch.int32)
            have += new
            self._dirty.add(slot.index)
            self.pages_mapped += extra
            slot.mapped = slot.target = need
        return True

    def flush(self) -> None:
        """Copies changed block-table rows to the device before a step reads them."""
        if self.block_table is not self._table_host:
            for row in self._dirty:
                self.block_table[row].copy_(self._table_host[row], non_blocking=True)
        self._dirty.clear()

    def attach_prefix(self, slot: Slot, req) -> int:
        """The baseline has no prefix caching."""
        return 0

    def index_request(self, req, upto_tokens: int, finished: bool = False) -> None:
        pass

    def prefix_stats(self) -> None:
        return None

    def map_ahead(self, wanted) -> None:
        """Blocks are plain indices: nothing to map ahead."""

    def poll(self) -> None:
        pass

    def _drain(self) -> None:
        pass

    def pool_stats(self) -> dict:
        used = self.num_blocks - len(self._free)
        return {
            "backend": "paged", "device": self.device.index or 0, "page_size": self.block_bytes,
            "total_pages": self.num_blocks, "free_pages": len(self._free), "used_pages": used, "shared_pages": 0,
            "mappings": used, "num_vtensors": 0, "reserved_bytes": self.num_blocks * self.block_bytes,
            "pages_mapped": self.pages_mapped, "pages_unmapped": 0, "pages_aliased": 0, "set_access_calls": 0,
            "pages_created": self.num_blocks, "pages_released": 0, "async_jobs": 0, "async_pages": 0, "waits": 0,
            "wait_seconds": 0.0, "map_seconds": 0.0, "set_access_seconds": 0.0, "unmap_seconds": 0.0,
        }

    def free_pages(self) -> int:
        return len(self._free)

    def slot_stats(self, tokens: dict[int, int]) -> list[dict]:
        return [
            {"slot": s.index, "owner": s.owner, "internal": s.owner == ANCHOR, "tokens": tokens.get(s.index, 0),
             "mapped_pages": len(self._blocks[s.index]),
             "queued_pages": 0, "reserved_pages": self.blocks_per_row,
             "waste_bytes": max(0, len(self._blocks[s.index]) * BLOCK_TOKENS - tokens.get(s.index, 0))
             * self.kv_bytes_per_token()}
            for s in self.slots
        ]

    def snapshot(self) -> dict:
        return {"pool": self.pool_stats(), "vtensors": []}

    def check_integrity(self, tokens: dict[int, int]) -> None:
        owned = [b for blocks in self._blocks for b in blocks]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert not set(owned) & set(self._free), "a block is both owned and free"
        assert len(owned) + len(self._free) == self.num_blocks
        for s in self.slots:
            blocks = self._blocks[s.index]
            assert len(blocks) >= self.pages_for(tokens.get(s.index, 0)), (s, tokens.get(s.index))
            assert self._table_host[s.index, :len(blocks)].tolist() == blocks

    def close(self) -> None:
        self._caches = []
