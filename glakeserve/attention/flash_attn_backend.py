"""A thin adapter over flash-attn's `flash_attn_with_kvcache`, used when the flash_attn package is
importable (`--attention-backend flash-attn`). It reads vTensor slots through `cache_batch_idx`;
K and V are stored with our Triton kernel. flash-attn's paged mode wants blocks of 256 tokens or
more, so the paged baseline (16-token blocks) stays on the Triton kernels."""

from __future__ import annotations

import torch

from glakeserve.attention import triton_ops as ops
from glakeserve.attention.base import AttentionBackend, AttentionMetadata


class FlashAttnBackend(AttentionBackend):
    name = "flash-attn"

    def __init__(self):
        from flash_attn import flash_attn_with_kvcache

        self._attend = flash_attn_with_kvcache

    def store_kv(self, k_cache, v_cache, k, v, meta: AttentionMetadata) -> None:
        ops.store_kv(k, v, k_cache, v_cache, meta.token_slots, meta.positions, block_table=meta.block_table)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, out=None) -> torch.Tensor:
        if meta.block_table is not None:
            raise ValueError("flash-attn needs pages of 256+ tokens; use --attention-backend triton with --kv-layout paged")
        if k_cache.dim() == 5:
            raise ValueError("flash-attn reads [slot, position] caches; the page-major layout needs --attention-backend "
                             "triton (or --kv-layout token-major)")
        slots = meta.slot_ids.to(torch.int32)
        lens = meta.context_lens.to(torch.int32)
        if meta.is_decode_only:  # q [B, 1, H, D]; the cache already holds this step's K and V
            o = self._attend(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=lens, cache_batch_idx=slots,
                             causal=True).squeeze(1)
            return o if out is None else out.copy_(o)
        out = torch.empty_like(q) if out is None else out
        start = 0
        for i, n in enumerate(meta.query_lens_host):  # causal aligned to the end: query j sees <= ctx - n + j
            out[start:start + n] = self._attend(q[start:start + n].unsqueeze(0), k_cache, v_cache,
                                                cache_seqlens=lens[i:i + 1], cache_batch_idx=slots[i:i + 1],
                                                causal=True)[0]
            start += n
        return out
