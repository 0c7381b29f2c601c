"""Triton kernels over vTensor KV caches: plain strided tensors, `cache[slot, pos, kv_head, dim]`
(token-major and per-layer) or `cache[slot, page, pos_in_page, kv_head, dim]` (page-major: a page's
tokens of one layer lie together), slot ids and lengths; no block tables. Each kernel sits beside a
thin wrapper that checks shapes, dtypes and strides before it launches.

  store_kv           k, v [tokens, kv_heads, dim] -> cache[token_slot, position]
  decode_attention   one query token per sequence; split-K over the context (flash-decoding),
                     one program serving all query heads of a KV head (GQA), then a combine step
  extend_attention   several query tokens per sequence (prefill, chunked prefill): causal, each
                     token attends to its slot's cached prefix and to the new tokens up to itself;
                     16-bit token-major and per-layer slots take a kernel that reads a slot's keys
                     as a plain strided matrix (whole-tile loads, in-place accumulation)

With block_table given, the same kernels address a paged cache instead (PAGED=True): caches are
[num_blocks, page, kv_heads, dim] and token n of row r lives in block block_table[r, n // page] at
offset n % page. That is the PagedAttention baseline, measured against with identical math.

They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ----- addressing ---------------------------------------------------------------------------------
@triton.jit
def _token_offsets(n, n_mask, row, c_slot, c_block, c_pos, block_table, bt_row, PAGED: tl.constexpr,
                   PAGE: tl.constexpr):
    """Element offsets of tokens n of a row: slot * c_slot + (n // PAGE) * c_block + (n % PAGE) *
    c_pos on a vTensor (PAGE 1 for [slot, pos] caches: n * c_block), or through the block table
    (paged, c_slot the block stride). int64: a slot's offset passes 2**31 elements in big caches."""
    if PAGED:
        blk = tl.load(block_table + row * bt_row + n // PAGE, mask=n_mask, other=0).to(tl.int64)
        return blk * c_slot + (n % PAGE).to(tl.int64) * c_pos
    else:
        return row * c_slot + (n // PAGE).to(tl.int64) * c_block + (n % PAGE).to(tl.int64) * c_pos


# ----- store ------------------------------------------------------------------------------------
@triton.jit
def _store_kv_kernel(k, v, k_cache, v_cache, token_slots, positions, block_table, bt_row,
                     k_tok, k_head, v_tok, v_head, c_slot, c_block, c_pos, c_head,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(token_slots + t).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = d < HEAD_DIM
    dst = _token_offsets(pos, True, slot, c_slot, c_block, c_pos, block_table, bt_row, PAGED, PAGE) + h * c_head + d
    tl.store(k_cache + dst, tl.load(k + t * k_tok + h * k_head + d, mask=mask), mask=mask)
    tl.store(v_cache + dst, tl.load(v + t * v_tok + h * v_head + d, mask=mask), mask=mask)


def _precision(q: torch.Tensor) -> str:
    """Tensor cores round float32 inputs to tf32 by default (1e-3 errors, enough to flip a greedy
    token): float32 models get exact products; 16-bit ones are exact on tensor cores anyway."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _geometry(block_table: torch.Tensor | None, k_cache: torch.Tensor) -> tuple:
    """(block table or a dummy pointer, its row stride, PAGED, PAGE, c_slot, c_block, c_pos, c_head)
    for a launch: how a token's element offset is found in this cache."""
    if block_table is not None:
        if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_table must be a 2-D int tensor, got {tuple(block_table.shape)} {block_table.dtype}")
        if k_cache.dim() != 4:
            raise ValueError(f"a paged cache is [blocks, block_tokens, kv_heads, dim], got {tuple(k_cache.shape)}")
        st = k_cache.stride()
        return block_table, block_table.stride(0), True, k_cache.shape[1], st[0], 0, st[1], st[2]
    st = k_cache.stride()
    if k_cache.dim() == 5:  # page-major: [slot, page, pos_in_page, kv_head, dim]
        return k_cache, 0, False, k_cache.shape[2], st[0], st[1], st[2], st[3]
    return k_cache, 0, False, 1, st[0], st[1], 0, st[2]


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() not in (4, 5) or k_cache.shape != v_cache.shape:
        raise ValueError(f"KV caches must be [slots, max_len, kv_heads, dim] or [slots, pages, page_tokens, kv_heads, "
                         f"dim] and alike, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"K and V caches need the same strides with a contiguous last dim, got {k_cache.stride()}, "
                         f"{v_cache.stride()}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"K cache is {k_cache.dtype} but V cache is {v_cache.dtype}")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             token_slots: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    """token_slots are slot ids, or block-table rows when block_table is given (paged)."""
    check_cache(k_cache, v_cache)
    bt, bt_row, paged, page, c_slot, c_block, c_pos, c_head = _geometry(block_table, k_cache)
    T, kvh, d = k.shape
    if v.shape != k.shape or (kvh, d) != tuple(k_cache.shape[-2:]):
        raise ValueError(f"k, v {tuple(k.shape)}, {tuple(v.shape)} do not fit caches {tuple(k_cache.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError("k and v need a contiguous last dim and the caches' dtype")
    if token_slots.shape != (T,) or positions.shape != (T,):
        raise ValueError(f"token_slots and positions must be [{T}]")
    if T == 0:
        return
    _store_kv_kernel[(T, kvh)](
        k, v, k_cache, v_cache, token_slots, positions, bt, bt_row, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), c_slot, c_block, c_pos, c_head, HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d), PAGED=paged, PAGE=page)


# ----- attention over cached keys (decode and extend share it) ---------------------------------
@triton.jit
def _attend_tiles(acc, m_i, l_i, qv, q_pos, k_cache, v_cache, slot, kv_head, n_start, n_stop, c_slot, c_block, c_pos,
                  c_head, block_table, bt_row, d, d_mask, scale, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                  PAGED: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over keys [n_start, n_stop), rows of qv against tiles of BLOCK_N keys. MASK: 0
    none (the range is whole tiles), 1 keys past n_stop, 2 those and keys past each row's q_pos."""
    for n0 in range(n_start, n_stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < n_stop
        tok = _token_offsets(n, n_mask, slot, c_slot, c_block, c_pos, block_table, bt_row, PAGED, PAGE)
        offs = tok[:, None] + kv_head * c_head + d[None, :]
        kt = tl.load(k_cache + offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(qv, tl.trans(kt), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        if MASK == 1:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        if MASK == 2:
            s = tl.where((n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_cache + offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# ----- decode -----------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(q, k_cache, v_cache, slot_ids, context_lens, part_out, part_lse, block_table, bt_row,
                         q_tok, q_head, c_slot, c_block, c_pos, c_head, po_seq, po_head, po_split, pl_seq, pl_head,
                         sm_scale, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         PAGED: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slot_ids + b).to(tl.int64)
    ctx = tl.load(context_lens + b)
    # this split's share of the context, in whole BLOCK_N tiles
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)  # query heads of this KV head (padded for tl.dot)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    qv = tl.load(q + b * q_tok + heads[:, None] * q_head + d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                 other=0.0)
    scale = sm_scale * 1.4426950408889634  # scores in log2 units, for exp2

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, qv, g, k_cache, v_cache, slot, kv_head, start, end, c_slot, c_block,
                                  c_pos, c_head, block_table, bt_row, d, d_mask, scale, 1, BLOCK_N, PAGED, PAGE,
                                  PRECISION)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # log2 units
    tl.store(part_out + b * po_seq + heads[:, None] * po_head + split * po_split + d[None, :], out,
             mask=g_mask[:, None] & d_mask[None, :])
    tl.store(part_lse + b * pl_seq + heads * pl_head + split, lse, mask=g_mask)


@triton.jit
def _decode_combine_kernel(part_out, part_lse, out, po_seq, po_head, po_split, pl_seq, pl_head, o_tok, o_head,
                           NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    d_mask = d < HEAD_DIM
    lse = tl.load(part_lse + b * pl_seq + h * pl_head + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - m)
    w = tl.where(s_mask, w, 0.0)
    parts = tl.load(part_out + b * po_seq + h * po_head + s[:, None] * po_split + d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out + b * o_tok + h * o_head + d, o.to(out.dtype.element_ty), mask=d_mask)


def num_decode_splits(batch: int, kv_heads: int, max_context: int, sms: int = 132) -> int:
    """Enough programs to fill the GPU about twice, but no split shorter than a few tiles."""
    want = max(1, -(-2 * sms // max(1, batch * kv_heads)))
    return int(max(1, min(want, max_context // 256, 64)))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                     context_lens: torch.Tensor, num_splits: int, out: torch.Tensor | None = None,
                     scratch: tuple[torch.Tensor, torch.Tensor] | None = None, block_n: int = 32,
                     block_table: torch.Tensor | None = None) -> torch.Tensor:
    """q [batch, heads, dim] (one token per sequence) -> [batch, heads, dim]. Reads only each slot's
    first context_lens[b] positions. num_splits is fixed by the caller (a CUDA graph keeps its grid).
    Tiles of 32 keys: as fast as 64 or faster at every batch and context of the H100 sweep
    (`benchmarks/kernels.py --decode-sweep`; 2x at batch 1 x 4096, where fewer, longer tiles leave
    the GPU waiting on each one)."""
    check_cache(k_cache, v_cache)
    bt, bt_row, paged, page, c_slot, c_block, c_pos, c_head = _geometry(block_table, k_cache)
    B, H, D = q.shape
    KVH = k_cache.shape[-2]
    if D != k_cache.shape[-1] or H % KVH or q.stride(-1) != 1 or q.dtype != k_cache.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not fit caches {tuple(k_cache.shape)} {k_cache.dtype}")
    if slot_ids.shape != (B,) or context_lens.shape != (B,):
        raise ValueError(f"slot_ids and context_lens must be [{B}]")
    group = H // KVH
    out = torch.empty_like(q) if out is None else out
    if scratch is None:
        scratch = decode_scratch(B, H, D, num_splits, q.device)
    part_out, part_lse = scratch
    block_d = triton.next_power_of_2(D)
    _decode_split_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, slot_ids, context_lens, part_out, part_lse, bt, bt_row,
        q.stride(0), q.stride(1), c_slot, c_block, c_pos, c_head,
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        D ** -0.5, NUM_SPLITS=num_splits, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n, PAGED=paged, PAGE=page, PRECISION=_precision(q), num_warps=4,
    )
    _decode_combine_kernel[(B, H)](
        part_out, part_lse, out, part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
        part_lse.stride(1), out.stride(0), out.stride(1), NUM_SPLITS=num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=D, BLOCK_D=block_d,
    )
    return out


def decode_scratch(batch: int, heads: int, dim: int, num_splits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=device),
            torch.empty(batch, heads, num_splits, dtype=torch.float32, device=device))


# ----- extend (prefill) ---------------------------------------------------------------------------
@triton.jit
def _extend_kernel(q, k_cache, v_cache, out, slot_ids, query_start, query_lens, context_lens, block_table, bt_row,
                   q_tok, q_head, o_tok, o_head, c_slot, c_block, c_pos, c_head, sm_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
                   PRECISION: tl.constexpr):
    mblock = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    qlen = tl.load(query_lens + b)
    if mblock * BLOCK_M >= qlen:
        return
    ctx = tl.load(context_lens + b)
    prefix = ctx - qlen  # cached tokens before this step's
    q0 = tl.load(query_start + b)
    slot = tl.load(slot_ids + b).to(tl.int64)
    kv_head = h // GROUP

    m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows within this sequence's new tokens
    d = tl.arange(0, BLOCK_D)
    m_mask = m < qlen
    d_mask = d < HEAD_DIM
    q_rows = (q0 + m).to(tl.int64)
    qv = tl.load(q + q_rows[:, None] * q_tok + h * q_head + d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                 other=0.0)
    scale = sm_scale * 1.4426950408889634  # scores in log2 units, for exp2
    q_pos = prefix + m  # each query's position in the slot

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys below the block's first query position are visible to all its queries: no mask there;
    # the rest, up to its last query, get the causal mask
    last = tl.minimum(prefix + (mblock + 1) * BLOCK_M, ctx)
    full = (prefix + mblock * BLOCK_M) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, qv, q_pos, k_cache, v_cache, slot, kv_head, 0, full, c_slot, c_block,
                                  c_pos, c_head, block_table, bt_row, d, d_mask, scale, 0, BLOCK_N, PAGED, PAGE,
                                  PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, qv, q_pos, k_cache, v_cache, slot, kv_head, full, last, c_slot,
                                  c_block, c_pos, c_head, block_table, bt_row, d, d_mask, scale, 2, BLOCK_N, PAGED,
                                  PAGE, PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + q_rows[:, None] * o_tok + h * o_head + d[None, :], o.to(out.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


# ----- extend over a slot read as a plain [keys, dim] matrix (token-major, per-layer) --------------
@triton.jit
def _strided_tiles(acc, m_i, l_i, qv, q_pos, k_base, v_base, c_tok, n_start, n_stop, d, scale,
                   MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """_attend_tiles for one slot and KV head whose keys are the rows of a [keys, dim] matrix of row
    stride c_tok at k_base (values at v_base), offsets in int32. Whole tiles load without masks
    (MASK 0; 2 masks keys past n_stop and past each row's q_pos); the scale is folded into the
    exponent (one multiply-add a score) and P @ V accumulates into acc in place. (TMA descriptors
    for these tiles measured slower on the H100: 353 against 391 TFLOP/s.)"""
    offs = tl.arange(0, BLOCK_N)
    for n0 in range(n_start, n_stop, BLOCK_N):
        n = n0 + offs
        if MASK == 0:
            kt = tl.load(k_base + n[:, None] * c_tok + d[None, :])
        else:
            kt = tl.load(k_base + n[:, None] * c_tok + d[None, :], mask=(n < n_stop)[:, None], other=0.0)
        s = tl.dot(qv, tl.trans(kt))  # [BLOCK_M, BLOCK_N], raw scores
        if MASK == 2:
            s = tl.where((n[None, :] <= q_pos[:, None]) & (n < n_stop)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale)  # running max, in scaled log2 units
        p = tl.exp2(s * scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASK == 0:
            vt = tl.load(v_base + n[:, None] * c_tok + d[None, :])
        else:
            vt = tl.load(v_base + n[:, None] * c_tok + d[None, :], mask=(n < n_stop)[:, None], other=0.0)
        acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _extend_strided_kernel(q, k_cache, v_cache, out, slot_ids, query_start, query_lens, context_lens,
                           q_tok, q_head, o_tok, o_head, c_slot, c_tok, c_head, sm_scale,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """_extend_kernel for caches whose slot is a [positions, kv_heads, dim] block (PAGE 1, no block
    table), 16-bit, HEAD_DIM a power of two. Query blocks run last-first: the last rows of a
    sequence see the most keys, and starting them first leaves short ones to fill the tail."""
    mblock = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    qlen = tl.load(query_lens + b).to(tl.int32)  # offsets within a slot are int32
    if mblock * BLOCK_M >= qlen:
        return
    ctx = tl.load(context_lens + b).to(tl.int32)
    prefix = ctx - qlen
    q0 = tl.load(query_start + b)
    slot = tl.load(slot_ids + b).to(tl.int64)
    kv_head = h // GROUP

    m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    m_mask = m < qlen
    q_rows = (q0 + m).to(tl.int64)
    qv = tl.load(q + q_rows[:, None] * q_tok + h * q_head + d[None, :], mask=m_mask[:, None], other=0.0)
    scale = sm_scale * 1.4426950408889634  # scores in log2 units, for exp2
    q_pos = prefix + m

    base = slot * c_slot + kv_head * c_head  # this slot's keys of this KV head: row n at base + n * c_tok
    k_base = k_cache + base
    v_base = v_cache + base

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    last = tl.minimum(prefix + (mblock + 1) * BLOCK_M, ctx)
    full = (prefix + mblock * BLOCK_M) // BLOCK_N * BLOCK_N  # keys every row of the block sees
    acc, m_i, l_i = _strided_tiles(acc, m_i, l_i, qv, q_pos, k_base, v_base, c_tok, 0, full, d, scale, 0, BLOCK_N)
    acc, m_i, l_i = _strided_tiles(acc, m_i, l_i, qv, q_pos, k_base, v_base, c_tok, full, last, d, scale, 2,
                                   BLOCK_N)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + q_rows[:, None] * o_tok + h * o_head + d[None, :], o.to(out.dtype.element_ty),
             mask=m_mask[:, None])


def extend_kernels(q: torch.Tensor, k_cache: torch.Tensor, paged: bool, page: int) -> list:
    """The extend kernels that can read these caches, best first: "strided" reads a slot as a plain
    [positions, dim] matrix of one KV head (16-bit, power-of-two head dim, no pages inside a slot,
    a slot's offsets within int32), "generic" reads any layout."""
    D = q.shape[-1]
    plain = not paged and page == 1 and q.element_size() == 2 and D == triton.next_power_of_2(D) and D >= 16
    return (["strided"] if plain and k_cache.shape[1] * k_cache.stride(1) < 2 ** 31 else []) + ["generic"]


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_ids: torch.Tensor,
                     query_start: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                     max_query_len: int, out: torch.Tensor | None = None, block_m: int | None = None,
                     block_n: int | None = None, block_table: torch.Tensor | None = None,
                     num_warps: int | None = None, num_stages: int = 3, kernel: str | None = None) -> torch.Tensor:
    """q [tokens, heads, dim] for all sequences back to back -> [tokens, heads, dim]. The new
    tokens' K and V must already be in the caches (store_kv first). Default tiles for 16-bit caches:
    128 queries x 128 keys with 8 warps where a query is that long, else 64 keys with 4 warps (the
    best of the H100 sweep, `benchmarks/kernels.py --sweep`: 128 x 64 ran 10% slower, 64 x 128 a
    third slower); float32 keeps 64-key tiles.
    kernel: "strided" or "generic" (the first of extend_kernels when None; the benchmarks and tests
    name one). The strided kernel's default tiles are 64 queries x 64 keys with 4 warps: in two H100
    sweeps (`benchmarks/kernels.py`) as fast as 128 x 64 with 8 warps or faster (396 / 390 against
    388 / 361 TFLOP/s, contiguous / token-major), and a short prompt pads less."""
    check_cache(k_cache, v_cache)
    bt, bt_row, paged, page, c_slot, c_block, c_pos, c_head = _geometry(block_table, k_cache)
    T, H, D = q.shape
    KVH = k_cache.shape[-2]
    B = slot_ids.shape[0]
    if D != k_cache.shape[-1] or H % KVH or q.stride(-1) != 1 or q.dtype != k_cache.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not fit caches {tuple(k_cache.shape)} {k_cache.dtype}")
    if query_start.shape != (B + 1,) or query_lens.shape != (B,) or context_lens.shape != (B,):
        raise ValueError(f"query_start must be [{B + 1}], query_lens and context_lens [{B}]")
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    usable = extend_kernels(q, k_cache, paged, page)
    kernel = kernel or usable[0]
    if kernel not in usable:
        raise ValueError(f"the {kernel!r} extend kernel cannot read caches {tuple(k_cache.shape)} {k_cache.dtype} "
                         f"strides {k_cache.stride()} (usable here: {usable})")
    block_m = min(block_m or (64 if kernel == "strided" else 128), max(16, triton.next_power_of_2(max_query_len)))
    grid = (triton.cdiv(max_query_len, block_m), B, H)
    if kernel == "strided":
        _extend_strided_kernel[grid](
            q, k_cache, v_cache, out, slot_ids, query_start, query_lens, context_lens, q.stride(0), q.stride(1),
            out.stride(0), out.stride(1), c_slot, c_block, c_head, D ** -0.5, GROUP=H // KVH, HEAD_DIM=D,
            BLOCK_M=block_m, BLOCK_N=block_n or 64, num_warps=num_warps or (8 if block_m >= 128 else 4),
            num_stages=num_stages)
        return out
    if block_n is None:  # 128 x 128 float32 tiles over 3 stages need 384 KiB of shared memory (H100: 227)
        block_n = 128 if block_m >= 128 and q.element_size() <= 2 else 64
    _extend_kernel[grid](
        q, k_cache, v_cache, out, slot_ids, query_start, query_lens, context_lens, bt, bt_row, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), c_slot, c_block, c_pos, c_head,
        D ** -0.5, GROUP=H // KVH, HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=block_m,
        BLOCK_N=block_n, PAGED=paged, PAGE=page, PRECISION=_precision(q),
        num_warps=num_warps or (8 if block_m >= 128 else 4), num_stages=num_stages,
    )
    return out
