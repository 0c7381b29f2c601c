"""The attention backend interface: one of the two seams that change (the other is the KV cache).

A batch is sequences back to back. Sequence i has query_lens[i] new tokens at positions
[context_lens[i] - query_lens[i], context_lens[i]) of its slot slot_ids[i]; its K and V for those
positions are written by store_kv, then forward attends each new token to every earlier position of
its slot (causal). Kernels see `k_cache[slot, pos, kv_head, dim]` views: no block tables.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_ids: torch.Tensor  # [batch] int64
    query_lens: torch.Tensor  # [batch] int64
    context_lens: torch.Tensor  # [batch] int64: tokens in the cache after this step
    query_start: torch.Tensor  # [batch + 1] int64: offsets of each sequence's tokens
    token_slots: torch.Tensor  # [tokens] int64: slot of each new token
    positions: torch.Tensor  # [tokens] int64: position of each new token in its slot
    # the same on the host, for backends that loop in Python
    query_lens_host: list[int]
    context_lens_host: list[int]
    slot_ids_host: list[int]
    max_query_len: int
    max_context_len: int
    block_table: torch.Tensor | None = None  # paged baseline: [rows, blocks]; None for vTensor slots
    num_splits: int = 1  # decode: programs per sequence and KV head along the context
    leading_decodes: int = 0  # sequences at the front of the batch with one new token each
    max_extend_query_len: int = 0  # longest query among the others
    scratch: dict = field(default_factory=dict)  # what a backend derives once a step and every layer reads

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    name: str

    def prepare_metadata(self, slot_ids: list[int], query_lens: list[int], context_lens: list[int],
                         device: torch.device, block_table: torch.Tensor | None = None,
                         to_device=None) -> AttentionMetadata:
        """to_device(values, dtype) makes a device tensor (the GPU runner stages through pinned
        memory so that nothing waits); by default, torch.tensor."""
        if to_device is None:
            def to_device(values, dtype):
                return torch.tensor(values, dtype=dtype, device=device)

        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        leading = 0  # the scheduler puts running (decoding) requests first
        while leading < len(query_lens) and query_lens[leading] == 1:
            leading += 1
        token_slots, positions = [], []
        for slot, n, ctx in zip(slot_ids, query_lens, context_lens):
            token_slots += [slot] * n
            positions += range(ctx - n, ctx)
        i64 = torch.int64
        return AttentionMetadata(
            slot_ids=to_device(slot_ids, i64), query_lens=to_device(query_lens, i64),
            context_lens=to_device(context_lens, i64), query_start=to_device(starts, i64),
            token_slots=to_device(token_slots, i64), positions=to_device(positions, i64),
            query_lens_host=list(query_lens), context_lens_host=list(context_lens), slot_ids_host=list(slot_ids),
            max_query_len=max(query_lens), max_context_len=max(context_lens), block_table=block_table,
            num_splits=self.decode_splits(len(slot_ids), max(context_lens)),
            leading_decodes=leading, max_extend_query_len=max(query_lens[leading:], default=0),
        )

    def decode_splits(self, batch: int, max_context: int) -> int:
        return 1

    supports_cuda_graphs = False

    def stats(self) -> dict:
        """The backend's own counters, for the engine's stats()."""
        return {}

    def close(self) -> None:
        """Gives back what the backend holds outside torch's allocator (a library handle)."""

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, padding_slot: int,
                block_table: torch.Tensor | None = None) -> None:
        """Compiles, before serving, the kernel variants that the batches' shapes select (backends
        that compile: Triton), working only on the padding slot's first token (through block_table
        on the paged baseline)."""

    @abstractmethod
    def store_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Writes k, v [tokens, kv_heads, dim] at (token_slots, positions) of the caches."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """q [tokens, heads, dim] -> [tokens, heads, dim], written into `out` when given (piecewise
        graphs read it from a fixed buffer)."""
