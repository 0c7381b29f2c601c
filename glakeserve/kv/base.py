"""The KV cache seam: what the scheduler, the runner and the engine ask of a KV cache. Two caches
implement it: vTensor slots (vtensor_cache.py, the point of this project) and the paged baseline
(paged.py, kept to be measured against).

Units. A *slot* is one request's KV address range (a block-table row for the baseline). A *block*
is one page-sized step of a slot: for a vTensor cache one page in every vTensor of the slot (one
page token-major, 2 x layers pages per-layer); for the baseline one 16-token block. A *page* is one
physical page of the pool: the unit memory is counted in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum

import torch

from glakeserve.kv.prefix import PrefixStats

ANCHOR = "(anchor: padding for CUDA graphs)"


class KVLayout(str, Enum):
    TOKEN_MAJOR = "token-major"
    PAGE_MAJOR = "page-major"
    PER_LAYER = "per-layer"
    PAGED = "paged"  # the block-table baseline


class KVCacheTooSmallError(ValueError):
    """The pool cannot hold even one request of max_model_len tokens."""


@dataclass
class Slot:
    index: int
    owner: str | None = None  # request id while a request runs in it
    tokens: list[int] = field(default_factory=list)  # tokens whose KV the slot holds while idle
    keys: list[int] = field(default_factory=list)  # chain keys of its blocks in the prefix index
    last_step: int = -1  # the last step whose kernels touch the slot


@dataclass(frozen=True)
class KVStats:
    """One shape for every cache: what the CLI, the server and the benchmarks read."""

    layout: str
    page_size: int  # bytes of one pool page
    pages_per_block: int  # pool pages behind one block of a slot
    tokens_per_block: int
    total_pages: int
    free_pages: int
    request_pages: int  # pages running requests hold
    cached_pages: int  # pages only idle slots hold (their KV is the prefix cache): reclaimable
    max_pages: int  # how far the pool may grow
    mapping_waits: int  # times a step waited for the mapping worker
    engine_driver_calls: int  # driver calls the engine's thread waited on (0 in steady state)
    reclaimed_pages: int  # pages taken back from idle slots for other requests
    pool: dict  # the allocator's counters (vTensor caches) or the baseline's equivalents
    prefix: PrefixStats | None
    prefix_disabled_reason: str | None


class KVCache(ABC):
    """Geometry (`k_cache(layer)[slot, pos, kv_head, dim]` views, a block table or None), the slots'
    lives (admit, reserve, release), the two points in a step where the cache works (begin_step
    before the launch, end_step after it), and the pool's whole life (limit, idle release)."""

    layout: KVLayout
    max_model_len: int
    num_slots: int
    block_table: torch.Tensor | None  # None: kernels address slots directly
    slots: list[Slot]

    # ----- geometry ---------------------------------------------------------------------------
    @abstractmethod
    def k_cache(self, layer: int) -> torch.Tensor:
        """[slots (or blocks), positions, kv_heads, head_dim], strided."""

    @abstractmethod
    def v_cache(self, layer: int) -> torch.Tensor: ...

    @abstractmethod
    def tokens_per_block(self) -> int: ...

    @abstractmethod
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers."""

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_block())

    def padding_slot(self) -> int:
        """The slot CUDA-graph batches pad with: mapped, never a request's."""
        return 0

    # ----- slots ------------------------------------------------------------------------------
    @abstractmethod
    def admit(self, req) -> bool:
        """Gives a waiting request a slot and the KV the cache already holds for its first tokens:
        sets req.slot and req.num_computed_tokens (at least one token is left to compute). False
        when every slot is taken."""

    @abstractmethod
    def reserve(self, req, tokens: int) -> bool:
        """Makes room for the request's first `tokens` tokens (reclaiming idle slots if need be).
        False when memory is short even so: the scheduler then preempts."""

    @abstractmethod
    def release(self, req) -> None:
        """The request is done, preempted or aborted: its slot goes idle. A vTensor slot keeps the
        KV of the tokens computed (the prefix cache); the baseline frees its blocks."""

    # ----- a step -----------------------------------------------------------------------------
    @abstractmethod
    def begin_step(self, batch) -> None:
        """Before the batch's kernels launch: every position they read or write is addressable."""

    @abstractmethod
    def end_step(self, batch, event: torch.cuda.Event | None) -> None:
        """After the launch, while the device computes: bookkeeping for later steps. `event` is
        recorded after the batch's kernels (None on a CPU)."""

    # ----- the pool's life --------------------------------------------------------------------
    @abstractmethod
    def set_limit(self, max_bytes: int) -> dict:
        """How far the pool may grow; lowering it gives free pages back at once."""

    @abstractmethod
    def release_idle(self) -> int:
        """With no request running: drops what idle slots keep and gives free pages back to the
        device. Returns the pages given back."""

    @abstractmethod
    def drop_cached(self) -> None:
        """Forgets the KV idle slots keep (their pages become free); running requests keep theirs."""

    # ----- inspection -------------------------------------------------------------------------
    @abstractmethod
    def stats(self) -> KVStats: ...

    @abstractmethod
    def slot_stats(self, tokens: dict[int, int]) -> list[dict]:
        """Per slot: owner, tokens, pages mapped / queued / shared / reserved, wasted bytes."""

    @abstractmethod
    def snapshot(self) -> dict:
        """The pool as plain data (what inspect-memory draws): pool counters, vTensors, refcounts."""

    @abstractmethod
    def check_integrity(self, tokens: dict[int, int]) -> None:
        """Raises AssertionError unless the books balance. tokens: KV tokens each running slot holds."""

    @abstractmethod
    def close(self) -> None: ...
