"""One-token linear layers on the GPU: y = W x for a single row x, W [out, in] row-major. At batch 1
a decode step is a chain of matrix reads; cuBLAS reads the smaller ones (q/k/v, o) at ~60% of the
copy bandwidth and splits others into a product and a reduction kernel (benchmarks/batch1_profile.py).
Here a program streams BLOCK_N whole rows of W against x, summing in float32, one kernel a layer.
Also runs in Triton's interpreter on the CPU (tests/test_gemv.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x, w, out, N, K, w_row, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w + rows.to(tl.int64)[:, None] * w_row + cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # partial sums; reduced across columns once at the end
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xv = tl.load(x + k0 + cols)
            wt = tl.load(w_ptrs + k0, mask=row_mask[:, None], other=0.0)
        else:
            col_mask = k0 + cols < K
            xv = tl.load(x + k0 + cols, mask=col_mask, other=0.0)
            wt = tl.load(w_ptrs + k0, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += wt.to(tl.float32) * xv.to(tl.float32)[None, :]
    tl.store(out + rows, tl.sum(acc, axis=1).to(out.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, block_n: int = 8,
         block_k: int = 512, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """x [1, in] -> [1, out] = x @ weight.T (into `out` [1, out] when given); weight [out, in] with a
    contiguous last dim, the same dtype as x. Default tiles: the best of the H100 sweep over
    Llama-3-8B's shapes (`benchmarks/gemv.py`: 3-10% faster than cuBLAS on each)."""
    N, K = weight.shape
    if x.shape != (1, K) or x.stride(-1) != 1 or weight.stride(-1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"gemv takes x [1, {K}] and weight [{N}, {K}] of one dtype with contiguous rows, got x "
                         f"{tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty(1, N, dtype=x.dtype, device=x.device) if out is None else out
    if out.shape != (1, N) or out.stride(-1) != 1:
        raise ValueError(f"out must be [1, {N}] with a contiguous last dim, got {tuple(out.shape)}")
    block_k = min(block_k, triton.next_power_of_2(K))
    _gemv_kernel[(triton.cdiv(N, block_n),)](x, weight, out, N, K, weight.stride(0), BLOCK_N=block_n,
                                              BLOCK_K=block_k, EVEN_K=K % block_k == 0, num_warps=num_warps,
                                              num_stages=num_stages)
    return out
