"""The GPU backend: Triton kernels (triton_ops.py) over vTensor slots or, for the paged baseline,
through the block table. Decode-only batches take the split-K decode kernel with a grid that
depends on the batch size alone, so a CUDA graph can hold it. With a CudnnPrefill (the "cudnn"
backend), steps with a long new-token run take cuDNN's fused attention for their extend rows."""

from __future__ import annotations

import torch

from glakeserve.attention import triton_ops as ops
from glakeserve.attention.base import AttentionBackend, AttentionMetadata
from glakeserve.attention.cudnn_prefill import CudnnPrefill, fits


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, kv_heads: int, sms: int = 132, prefill: CudnnPrefill | None = None):
        self.kv_heads = kv_heads
        self.sms = sms
        self.prefill = prefill
        if prefill is not None:
            self.name = "cudnn"

    def stats(self) -> dict:
        if self.prefill is None:
            return {}
        # graphs built after start-up: each paused the engine thread for about 0.1 s
        return {"cudnn_steps": self.prefill.steps, "cudnn_graphs": len(self.prefill.graphs),
                "cudnn_graphs_built_while_serving": self.prefill.built_while_serving}

    def close(self) -> None:
        if self.prefill is not None:
            self.prefill.close()

    def decode_splits(self, batch: int, max_context: int) -> int:
        # about two waves of programs over the GPU, whatever the context (a graph cannot know it);
        # a power of two, so the few kernel variants are compiled when the decode graphs are captured
        # (mixed steps have any number of decode rows: each new split count would compile mid-serving)
        want = max(1, min(16, -(-2 * self.sms // max(1, batch * self.kv_heads))))
        return 1 << (want - 1).bit_length()

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, padding_slot: int,
                block_table: torch.Tensor | None = None) -> None:
        """The extend kernel's tile height follows a step's longest query (16 to 128 rows), and Triton
        specializes pointers on 16-byte alignment: a mixed step passes its metadata from the first
        non-decode row on, 8-byte aligned after an odd number of decode rows. Compile each variant
        now, on one query over the padding slot's first token (the paged baseline's padding row),
        not on a user's request."""
        dev = k_cache.device
        q = torch.zeros(1, heads, k_cache.shape[-1], dtype=k_cache.dtype, device=dev)
        i64 = dict(dtype=torch.int64, device=dev)
        for skip in (0, 1):  # metadata starting at an aligned element, then at an odd one
            slot = torch.full((1 + skip,), padding_slot, **i64)[skip:]
            one = torch.ones(1 + skip, **i64)[skip:]
            starts = torch.tensor([0] * skip + [0, 1], **i64)[skip:]
            for longest in (16, 32, 64, 128):
                ops.extend_attention(q, k_cache, v_cache, slot, starts, one, one, longest, block_table=block_table)
        if self.prefill is not None:  # its graphs, for q as the model passes it: a view of the fused q, k, v
            kvh, dim = k_cache.shape[-2:]
            q = torch.empty(1, heads + 2 * kvh, dim, dtype=k_cache.dtype, device=dev)[:, :heads]
            if fits(q, k_cache, block_table):
                self.prefill.warm_up(k_cache.dtype, heads, kvh, dim, k_cache)

    def store_kv(self, k_cache, v_cache, k, v, meta: AttentionMetadata) -> None:
        ops.store_kv(k, v, k_cache, v_cache, meta.token_slots, meta.positions, block_table=meta.block_table)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, out=None) -> torch.Tensor:
        if meta.is_decode_only:
            return ops.decode_attention(q, k_cache, v_cache, meta.slot_ids, meta.context_lens, meta.num_splits,
                                        out=out, block_table=meta.block_table)
        # a mixed step: the decoding sequences in front take the decode kernel (the extend kernel would
        # spend a 128-row tile on each one-token query); the rest take the extend kernel
        n = meta.leading_decodes
        out = torch.empty_like(q) if out is None else out
        if n:
            ops.decode_attention(q[:n], k_cache, v_cache, meta.slot_ids[:n], meta.context_lens[:n],
                                 self.decode_splits(n, meta.max_context_len), out=out[:n],
                                 block_table=meta.block_table)
        if self.prefill is not None and self.prefill.wanted(q, k_cache, meta):
            self.prefill.attend(q, k_cache, v_cache, meta, n, out)
            return out
        return ops.extend_attention(q, k_cache, v_cache, meta.slot_ids[n:], meta.query_start[n:],
                                    meta.query_lens[n:], meta.context_lens[n:], meta.max_extend_query_len, out=out,
                                    block_table=meta.block_table)
