"""The fused Triton kernels against their torch twins (fresh random inputs, poisoned outputs): in
Triton's interpreter on the CPU, in bfloat16 at Llama sizes on a GPU."""

import pytest
import torch

from glakeserve.model import fused_ops as F
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.model.llama import RotaryEmbedding

CASES = [pytest.param("cpu", torch.float32, 96, 1e-5, id="cpu-fp32"),
         pytest.param("cpu", torch.float16, 96, 2e-3, id="cpu-fp16"),
         pytest.param("cuda", torch.bfloat16, 4096, 2e-2, id="gpu-bf16", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,dtype,hidden,tol", CASES)
def test_add_rms_norm(device, dtype, hidden, tol):
    x = torch.randn(7, hidden, device=device).to(dtype)
    res = torch.randn(7, hidden, device=device).to(dtype)
    w = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    ref_out, ref_res = F.add_rms_norm_torch(x, res.clone(), w, 1e-5)
    out, new_res = F.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(new_res, ref_res, atol=tol, rtol=tol)
    torch.testing.assert_close(out, ref_out, atol=tol * 4, rtol=tol * 4)
    first, stream = F.add_rms_norm(x, None, w, 1e-5)  # the first layer: x starts the stream
    torch.testing.assert_close(first, F.rms_norm_torch(x, w, 1e-5), atol=tol * 4, rtol=tol * 4)
    assert torch.equal(stream, x) and stream.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("device,dtype,hidden,tol", CASES)
def test_silu_mul(device, dtype, hidden, tol):
    gu = torch.randn(5, 2 * hidden + 64, device=device).to(dtype)
    torch.testing.assert_close(F.silu_mul(gu), F.silu_mul_torch(gu), atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("device,dtype,hidden,tol", CASES)
def test_rope_in_place(device, dtype, hidden, tol):
    cfg = DUMMY_SHAPES["llama-3-8b"] if device == "cuda" else DUMMY_SHAPES["tiny-llama"]
    rot = RotaryEmbedding(cfg, 512, torch.device(device))
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pos = torch.randint(0, 512, (9,), device=device)
    cos, sin = rot.tables(pos, dtype)
    qkv = torch.randn(9, H + 2 * KVH, D, device=device).to(dtype)
    ref = qkv.clone()
    F.rope_torch(ref, H + KVH, cos, sin)
    F.rope_(qkv, H + KVH, cos, sin)
    torch.testing.assert_close(qkv, ref, atol=tol * 4, rtol=tol * 4)
    assert torch.equal(qkv[:, H + KVH:], ref[:, H + KVH:])  # v untouched


def test_wrappers_check_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        F.add_rms_norm(torch.zeros(2, 8), None, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="silu_mul wants"):
        F.silu_mul(torch.zeros(2, 7))
