"""The sampling pass in Triton: programs walk the vocabulary once, hashing (row key, token id) into
Gumbel noise in registers and keeping the running argmax. The same function as
sampling.gumbel_argmax_torch (32-bit arithmetic here, int64 masked to 32 bits there).

A small batch splits each row's vocabulary over several programs (one program walking 128K logits
alone took 78 us of a 6.3 ms batch-1 step, benchmarks/batch1_profile.py); a second kernel then picks
each row's best of the splits' winners."""

from __future__ import annotations

import functools

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


@triton.jit(do_not_specialize=["l_row", "V", "CHUNK", "splits"])  # one variant for all sizes: no compile mid-run
def _gumbel_argmax_kernel(logits, l_row, temps, seeds, steps, out, part_val, part_idx, V, CHUNK, splits,
                          BLOCK: tl.constexpr, FINAL: tl.constexpr):
    r = tl.program_id(0)
    split = tl.program_id(1)  # this program's share of the row: [split * CHUNK, + CHUNK)
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
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, V)
    for v0 in range(start, stop, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        mask = v < stop
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
    if FINAL:  # the row's only split
        tl.store(out + r, best_i)
    else:
        tl.store(part_val + r * splits + split, best)
        tl.store(part_idx + r * splits + split, best_i)


@triton.jit(do_not_specialize=["splits"])
def _pick_best_split_kernel(part_val, part_idx, out, splits, MAX_SPLITS: tl.constexpr):
    r = tl.program_id(0)
    s = tl.arange(0, MAX_SPLITS)
    vals = tl.load(part_val + r * splits + s, mask=s < splits, other=float("-inf"))
    # the first split holding the row's maximum: splits are in vocabulary order, so the earliest token
    i = tl.argmax(vals, axis=0, tie_break_left=True)
    tl.store(out + r, tl.load(part_idx + r * splits + i))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


MAX_SPLITS = 64


def vocab_splits(batch: int, vocab: int, sms: int, block: int) -> int:
    """About two programs an SM, at least a block each, at most MAX_SPLITS."""
    want = max(1, -(-2 * sms // max(1, batch)))
    return min(want, -(-vocab // block), MAX_SPLITS)


def gumbel_argmax(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  block: int = 4096, splits: int | None = None) -> torch.Tensor:
    """logits [batch, vocab] (float32, last dim contiguous) -> token ids [batch] int64. splits: programs
    a row (vocab_splits' choice when None). Two compiled variants in all (one split or several):
    warm_up() compiles both before serving."""
    B, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits need a contiguous last dim")
    if temps.shape != (B,) or seeds.shape != (B,) or steps.shape != (B,):
        raise ValueError(f"temps, seeds and steps must be [{B}]")
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if not B:
        return out
    block = min(block, triton.next_power_of_2(V))
    splits = splits or vocab_splits(B, V, _sm_count(logits.device), block)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be 1 to {MAX_SPLITS}, got {splits}")
    chunk = triton.cdiv(triton.cdiv(V, block), splits) * block  # whole blocks a split; the last may get none
    part_val = torch.empty(B, splits, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(B, splits, dtype=torch.int64, device=logits.device)
    _gumbel_argmax_kernel[(B, splits)](logits, logits.stride(0), temps, seeds, steps, out, part_val, part_idx, V,
                                       chunk, splits, BLOCK=block, FINAL=splits == 1, num_warps=8)
    if splits > 1:
        _pick_best_split_kernel[(B,)](part_val, part_idx, out, splits, MAX_SPLITS=MAX_SPLITS)
    return out


def warm_up(vocab: int, device: torch.device) -> None:
    """Compiles both variants of the pass for this vocabulary now, not on a user's first steps."""
    logits = torch.zeros(1, vocab, dtype=torch.float32, device=device)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    for splits in (1, 2):
        gumbel_argmax(logits, torch.ones(1, device=device), zero, zero, splits=splits)
