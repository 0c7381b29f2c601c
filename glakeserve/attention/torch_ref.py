"""The reference backend: plain torch, any device. Correct first; the CPU path of every test."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glakeserve.attention.base import AttentionBackend, AttentionMetadata


class TorchReferenceBackend(AttentionBackend):
    name = "torch"

    def store_kv(self, k_cache, v_cache, k, v, meta: AttentionMetadata) -> None:
        if meta.block_table is None and k_cache.dim() == 5:  # page-major: [slot, page, pos_in_page, ...]
            page = k_cache.shape[2]
            k_cache[meta.token_slots, meta.positions // page, meta.positions % page] = k
            v_cache[meta.token_slots, meta.positions // page, meta.positions % page] = v
            return
        if meta.block_table is None:
            k_cache[meta.token_slots, meta.positions] = k
            v_cache[meta.token_slots, meta.positions] = v
            return
        page = k_cache.shape[1]  # paged: token p of row r is in block table[r, p // page], at p % page
        blocks = meta.block_table[meta.token_slots, meta.positions // page].long()
        k_cache[blocks, meta.positions % page] = k
        v_cache[blocks, meta.positions % page] = v

    @staticmethod
    def _sequence(cache, slot, ctx, block_table):
        """[ctx, KVH, D] of one slot or block-table row."""
        if block_table is None and cache.dim() == 5:  # page-major: the slot's pages back to back
            page = cache.shape[2]
            return cache[slot, : -(-ctx // page)].flatten(0, 1)[:ctx]
        if block_table is None:
            return cache[slot, :ctx]
        page = cache.shape[1]
        return cache[block_table[slot, : -(-ctx // page)].long()].flatten(0, 1)[:ctx]

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, out=None) -> torch.Tensor:
        out = torch.empty_like(q) if out is None else out
        heads, kv_heads = q.shape[1], k_cache.shape[-2]
        start = 0
        for slot, n, ctx in zip(meta.slot_ids_host, meta.query_lens_host, meta.context_lens_host):
            qi = q[start:start + n].transpose(0, 1)  # [H, n, D]
            k = self._sequence(k_cache, slot, ctx, meta.block_table).transpose(0, 1)  # [KVH, ctx, D]
            v = self._sequence(v_cache, slot, ctx, meta.block_table).transpose(0, 1)
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
