"""The sampling pass as one Triton kernel: a program per row walks the vocabulary once, hashing
(row key, token id) into Gumbel noise in registers and keeping the running argmax. The same function
as sampling.gumbel_argmax_torch (32-bit arithmetic here, int64 masked to 32 bits there)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    """murmur3 fmix32 on uint32 (multiplies wrap, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _gumbel_argmax_kernel(logits, l_row, temps, seeds, steps, out, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    temp = tl.load(temps + r)
    seed = tl.load(seeds + r)
    step = tl.load(steps + r)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    golden = tl.full((), 0x9E3779B9, tl.uint32)
    key = _mix32(_mix32(lo ^ _mix32(hi)) + (step & 0xFFFFFFFF).to(tl.uint32) * golden)
    greedy = temp == 0.0
    inv_temp = 1.0 / tl.where(greedy, 1.0, temp)
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for v0 in range(0, V, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        mask = v < V
        x = tl.load(logits + r.to(tl.int64) * l_row + v, mask=mask, other=float("-inf")).to(tl.float32)
        bits = _mix32(key + v.to(tl.uint32) * golden)
        u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # strictly inside (0, 1): sampling.bits_to_uniform
        noisy = x * inv_temp - tl.log(-tl.log(u))
        k = tl.where(greedy, x, noisy)
        k = tl.where(mask, k, float("-inf"))
        m = tl.max(k, axis=0)
        i = tl.argmax(k, axis=0).to(tl.int64)
        better = m > best  # strictly: the earliest maximum wins, as torch.argmax
        best_i = tl.where(better, v0 + i, best_i)
        best = tl.where(better, m, best)
    tl.store(out + r, best_i)


def gumbel_argmax(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  block: int = 4096) -> torch.Tensor:
    """logits [batch, vocab] (float32, last dim contiguous) -> token ids [batch] int64."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits need a contiguous last dim")
    if temps.shape != (B,) or seeds.shape != (B,) or steps.shape != (B,):
        raise ValueError(f"temps, seeds and steps must be [{B}]")
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B:
        _gumbel_argmax_kernel[(B,)](logits, logits.stride(0), temps, seeds, steps, out, V,
                                    BLOCK=min(block, triton.next_power_of_2(V)), num_warps=8)
    return out
