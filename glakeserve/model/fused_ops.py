"""Fused elementwise kernels for the GPU path (profiling showed ~30 kernels a layer, most of them tiny):

  add_rms_norm  residual += x; out = rms_norm(residual) * weight      (one kernel instead of ~8)
  silu_mul      out = silu(gate) * up from the fused gate-up output    (one instead of three)
  rope_         rotate q and k in place from the fused qkv output      (one instead of ~8)

Each has a torch twin with the same arithmetic, used on the CPU and as the tests' reference; the
Triton ones also run in Triton's interpreter on the CPU (tests/test_fused_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# ----- torch twins ----------------------------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op, bit-identical to the composition below in float32
        return F.rms_norm(x, weight.shape, weight, eps)
    # normalised in float32, like HF's LlamaRMSNorm, then scaled in the model's dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(x, residual, weight, eps):
    residual = x if residual is None else residual + x
    return rms_norm_torch(residual, weight, eps), residual


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_torch(qkv: torch.Tensor, heads: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotates the first `heads` heads of qkv [tokens, all_heads, dim] in place (HF's rotate-half:
    x * cos + rotate_half(x) * sin, with rotate_half folded into signed_sin)."""
    x = qkv[:, :heads]
    x.copy_(x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin)


# ----- Triton -------------------------------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(x, residual, weight, out, x_row, r_row, o_row, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < N
    h = tl.load(x + row * x_row + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(residual + row * r_row + c, mask=mask, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(residual + row * r_row + c, h, mask=mask)  # the sum, rounded to the model's dtype
    hf = h.to(tl.float32)
    normed = hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
    w = tl.load(weight + c, mask=mask, other=0.0)
    # like HF: the normalised row is rounded to the model's dtype before the weight is applied
    y = normed.to(h.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out + row * o_row + c, y.to(out.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rms_norm(residual + x) * weight, residual + x); residual is updated in place. residual None:
    the first layer, where x itself starts the residual stream (it is copied)."""
    T, N = x.shape
    if x.stride(-1) != 1 or weight.shape != (N,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)}, residual, weight {tuple(weight.shape)} do not fit")
    if residual is None:
        residual = x.clone()
        has_residual = False
    else:
        has_residual = True
    out = torch.empty_like(residual)
    if T:
        _add_rms_norm_kernel[(T,)](x if has_residual else residual, residual, weight, out,
                                   (x if has_residual else residual).stride(0), residual.stride(0), out.stride(0), eps,
                                   N=N, BLOCK=triton.next_power_of_2(N), HAS_RESIDUAL=has_residual, num_warps=4)
    return out, residual


@triton.jit
def _silu_mul_kernel(gate_up, out, g_row, o_row, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < N
    g = tl.load(gate_up + row * g_row + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_up + row * g_row + N + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + row * o_row + c, (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    T, two_n = gate_up.shape
    if two_n % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul wants [tokens, 2 * intermediate] with a contiguous last dim, got {tuple(gate_up.shape)}")
    n = two_n // 2
    out = torch.empty(T, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if T:
        _silu_mul_kernel[(T, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), N=n, BLOCK=block)
    return out


@triton.jit
def _rope_kernel(qkv, cos, sin, t_row, h_row, c_row, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    base = qkv + t * t_row + h * h_row
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos + t * c_row + i, mask=mask, other=0.0)
    c2 = tl.load(cos + t * c_row + HALF + i, mask=mask, other=0.0)
    s1 = tl.load(sin + t * c_row + i, mask=mask, other=0.0)  # signed: the first half holds -sin
    s2 = tl.load(sin + t * c_row + HALF + i, mask=mask, other=0.0)
    ty = qkv.dtype.element_ty
    tl.store(base + i, (x1 * c1 + x2 * s1).to(ty), mask=mask)
    tl.store(base + HALF + i, (x2 * c2 + x1 * s2).to(ty), mask=mask)


def rope_(qkv: torch.Tensor, heads: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """In place on the first `heads` heads of qkv [tokens, all_heads, dim]; cos and signed_sin are
    [tokens, 1, dim] in float32 (RotaryEmbedding.tables)."""
    T, _, D = qkv.shape
    if qkv.stride(-1) != 1 or cos.shape[0] != T or cos.shape[-1] != D:
        raise ValueError(f"rope_: qkv {tuple(qkv.shape)} and tables {tuple(cos.shape)} do not fit")
    if T:
        _rope_kernel[(T, heads)](qkv, cos, signed_sin, qkv.stride(0), qkv.stride(1), cos.stride(0), HALF=D // 2,
                                 BLOCK=triton.next_power_of_2(D // 2))
