"""The one-token GEMV (glakeserve/model/gemv.py) against a float32 torch product on fresh random
shapes: rows not a multiple of the row block, columns not a multiple of the column block, into a
given output. Triton's interpreter on the CPU (float16: its bfloat16 is not exact), bfloat16 on a GPU."""

import random

import pytest
import torch

from glakeserve.model.gemv import gemv

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_n,block_k", [(16, 64), (4, 128), (8, 32)])
def test_gemv_equals_the_product(device, block_n, block_k):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    n, k = random.randint(1, 90), random.choice([block_k * random.randint(1, 6), random.randint(1, 500)])
    w = torch.randn(n, k, device=device).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    out = torch.full((1, n), float("nan"), device=device, dtype=dtype)
    got = gemv(x, w, out=out, block_n=block_n, block_k=block_k)
    assert got.data_ptr() == out.data_ptr()
    want = x.float() @ w.float().t()
    torch.testing.assert_close(got.float(), want, atol=0.02 * float(want.abs().max()) + 1e-3, rtol=0.01)


def test_gemv_refuses_what_it_cannot_read():
    w = torch.randn(8, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="gemv takes x"):
        gemv(torch.randn(2, 32, dtype=torch.float16), w)  # two rows
    with pytest.raises(ValueError, match="gemv takes x"):
        gemv(torch.randn(1, 32), w)  # float32 against float16
    with pytest.raises(ValueError, match="out must be"):
        gemv(torch.randn(1, 32, dtype=torch.float16), w, out=torch.empty(1, 9, dtype=torch.float16))
