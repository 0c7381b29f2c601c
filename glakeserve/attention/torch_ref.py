"""The reference backend: plain torch, any device. Correct first; the CPU path of every test."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glakeserve.attention.base import AttentionBackend, AttentionMetadata


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def store_kv(self, k_cache, v_cache, k, v, meta: AttentionMetadata) -> None:
        k_cache[meta.token_slots, meta.positions] = k
        v_cache[meta.token_slots, meta.positions] = v

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        heads, kv_heads = q.shape[1], k_cache.shape[2]
        start = 0
        for slot, n, ctx in zip(meta.slot_ids_host, meta.query_lens_host, meta.context_lens_host):
            qi = q[start:start + n].transpose(0, 1)  # [H, n, D]
            k = k_cache[slot, :ctx].transpose(0, 1)  # [KVH, ctx, D]
            v = v_cache[slot, :ctx].transpose(0, 1)
            gqa = heads != kv_heads
            if n == 1:  # grouped matmuls: 2-3x faster than SDPA for one query on the CPU
                group = heads // kv_heads
                scores = (qi.reshape(kv_heads, group, -1) @ k.transpose(1, 2)) * qi.shape[-1] ** -0.5
                o = (scores.softmax(dim=-1) @ v).reshape(heads, 1, -1)  # [H, 1, D]
            elif n == ctx:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, enable_gqa=gqa)
            else:  # a chunk after a cached prefix: token j sees positions <= ctx - n + j
                mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n)
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, enable_gqa=gqa)
            out[start:start + n] = o.transpose(0, 1)
            start += n
        return out
