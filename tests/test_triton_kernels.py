"""The Triton attention kernels against a plain torch reference, on fresh random inputs with
NaN-poisoned outputs: the three vTensor layouts and the paged baseline, ragged lengths, lengths at page
and tile boundaries, GQA and MHA. On the CPU they run in Triton's interpreter at small shapes; on a
GPU (`gpu` marker) at Llama shapes in bfloat16."""

import math
import random

import pytest
import torch

from glakeserve.attention import triton_ops as T

PAGE = 16
CPU_SHAPE = dict(heads=4, kv_heads=2, dim=32, max_len=96, slots=5, dtype=torch.float32, atol=1e-4)
GPU_SHAPES = {
    "llama3-8b-gqa": dict(heads=32, kv_heads=8, dim=128, max_len=4096, slots=16, dtype=torch.bfloat16, atol=2e-2),
    "llama2-7b-mha": dict(heads=32, kv_heads=32, dim=128, max_len=2048, slots=8, dtype=torch.bfloat16, atol=2e-2),
}


def shapes():
    return [pytest.param(CPU_SHAPE, id="cpu-small")] + [
        pytest.param(shape, id=name, marks=pytest.mark.gpu) for name, shape in GPU_SHAPES.items()]


class Caches:
    """The same logical KV (slot, position) in one of four physical layouts."""

    def __init__(self, layout, slots, max_len, kv_heads, dim, dtype, device, layers=3, layer=1):
        self.layout = layout
        g = torch.Generator(device="cpu").manual_seed(random.getrandbits(31))

        def rand(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).to(device)

        self.block_table = None
        if layout == "token-major":  # slot: [max_len, layers, 2, kv_heads, dim]; caches are strided views
            base = rand(slots, max_len, layers, 2, kv_heads, dim)
            self.k, self.v = base[:, :, layer, 0], base[:, :, layer, 1]
        elif layout == "page-major":  # slot: [pages, layers, 2, PAGE, kv_heads, dim]
            base = rand(slots, max_len // PAGE, layers, 2, PAGE, kv_heads, dim)
            self.k, self.v = base[:, :, layer, 0], base[:, :, layer, 1]  # [slots, pages, PAGE, kvh, dim]
        elif layout == "per-layer":
            self.k, self.v = rand(slots, max_len, kv_heads, dim), rand(slots, max_len, kv_heads, dim)
        else:  # paged: blocks handed out in a random order
            per_row = max_len // PAGE
            blocks = slots * per_row + 3
            self.k, self.v = rand(blocks, PAGE, kv_heads, dim), rand(blocks, PAGE, kv_heads, dim)
            perm = torch.randperm(blocks, generator=g)[: slots * per_row]
            self.block_table = perm.view(slots, per_row).to(torch.int32).to(device)

    def sequence(self, slot, length):
        """[length, kv_heads, dim] K and V of a slot, gathered the slow, obvious way."""
        if self.layout == "page-major":
            return self.k[slot].flatten(0, 1)[:length], self.v[slot].flatten(0, 1)[:length]
        if self.block_table is None:
            return self.k[slot, :length], self.v[slot, :length]
        rows = self.block_table[slot].long()
        k = self.k[rows].flatten(0, 1)[:length]
        v = self.v[rows].flatten(0, 1)[:length]
        return k, v


def reference(q, k, v, qlen):
    """q [qlen, H, D], k/v [ctx, KVH, D] -> [qlen, H, D]: causal, the queries being the last qlen positions."""
    H, KVH = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(H // KVH, dim=1).transpose(0, 1)
    v = v.float().repeat_interleave(H // KVH, dim=1).transpose(0, 1)
    s = q.float().transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    ctx = k.shape[1]
    pos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(ctx, device=q.device)[None, :] > pos, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


def lengths(max_len, n):
    """Ragged context lengths with page and tile edges among them."""
    edges = [1, PAGE - 1, PAGE, PAGE + 1, 64, 65, max_len - 1, max_len]
    picked = random.sample(edges, k=min(len(edges), n // 2)) + [random.randint(1, max_len) for _ in range(n)]
    return picked[:n]


@pytest.mark.parametrize("layout", ["token-major", "page-major", "per-layer", "paged"])
@pytest.mark.parametrize("shape", shapes())
def test_decode_attention(layout, shape):
    dev = "cuda" if shape["dtype"] == torch.bfloat16 else "cpu"
    c = Caches(layout, shape["slots"], shape["max_len"], shape["kv_heads"], shape["dim"], shape["dtype"], dev)
    B = shape["slots"]
    slots = random.sample(range(shape["slots"]), B)
    ctx = lengths(shape["max_len"], B)
    q = torch.randn(B, shape["heads"], shape["dim"], device=dev).to(shape["dtype"])
    out = torch.full_like(q, float("nan"))
    splits = random.choice([1, 3, 4])
    T.decode_attention(q, c.k, c.v, torch.tensor(slots, device=dev), torch.tensor(ctx, device=dev), splits, out=out,
                       block_table=c.block_table, block_n=16 if dev == "cpu" else 64)
    for i in range(B):
        k, v = c.sequence(slots[i], ctx[i])
        torch.testing.assert_close(out[i].float(), reference(q[i:i + 1], k, v, 1)[0], atol=shape["atol"], rtol=0.02)


def check_extend(layout, shape, kernel=None):
    """Some prefill from 0, some extend a cached prefix; every output row against the reference."""
    dev = "cpu" if shape["dtype"] in (torch.float32, torch.float16) else "cuda"
    c = Caches(layout, shape["slots"], shape["max_len"], shape["kv_heads"], shape["dim"], shape["dtype"], dev)
    B = min(4, shape["slots"])
    slots = random.sample(range(shape["slots"]), B)
    ctx = lengths(shape["max_len"], B)
    qlen = [random.randint(1, n) for n in ctx]
    qlen[0] = ctx[0]
    starts = [0]
    for n in qlen:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], shape["heads"], shape["dim"], device=dev).to(shape["dtype"])
    out = torch.full_like(q, float("nan"))
    t = lambda x: torch.tensor(x, device=dev)  # noqa: E731
    T.extend_attention(q, c.k, c.v, t(slots), t(starts), t(qlen), t(ctx), max(qlen), out=out,
                       block_table=c.block_table, block_m=16 if dev == "cpu" else 128,
                       block_n=16 if dev == "cpu" else 64, kernel=kernel)
    for i in range(B):
        k, v = c.sequence(slots[i], ctx[i])
        torch.testing.assert_close(out[starts[i]:starts[i + 1]].float(), reference(q[starts[i]:starts[i + 1]], k, v,
                                                                                  qlen[i]),
                                   atol=shape["atol"], rtol=0.02)


@pytest.mark.parametrize("layout", ["token-major", "page-major", "per-layer", "paged"])
@pytest.mark.parametrize("shape", shapes())
def test_extend_attention_after_a_cached_prefix(layout, shape):
    check_extend(layout, shape)


CPU_HALF = dict(CPU_SHAPE, dtype=torch.float16, atol=2e-3)  # the interpreter's bfloat16 is not exact


@pytest.mark.parametrize("kernel", ["strided", "generic"])
@pytest.mark.parametrize("layout", ["token-major", "per-layer"])
@pytest.mark.parametrize("shape", [pytest.param(CPU_HALF, id="cpu-half")] + [
    pytest.param(shape, id=name, marks=pytest.mark.gpu) for name, shape in GPU_SHAPES.items()])
def test_each_extend_kernel_on_plain_slots(kernel, layout, shape):
    """The 16-bit fast path (a slot read as a plain [positions, dim] matrix) and the generic kernel,
    each named, on the layouts the fast one serves."""
    check_extend(layout, shape, kernel)


@pytest.mark.parametrize("layout", ["page-major", "paged"])
def test_the_strided_extend_kernel_refuses_paged_slots(layout):
    c = Caches(layout, 2, 32, 2, 32, torch.float16, "cpu")
    q = torch.zeros(4, 4, 32, dtype=torch.float16)
    one = torch.tensor([4])
    with pytest.raises(ValueError, match="the 'strided' extend kernel cannot read"):
        T.extend_attention(q, c.k, c.v, torch.tensor([0]), torch.tensor([0, 4]), one, one, 4,
                           block_table=c.block_table, kernel="strided")


@pytest.mark.parametrize("layout", ["token-major", "page-major", "per-layer", "paged"])
@pytest.mark.parametrize("shape", shapes())
def test_store_kv(layout, shape):
    dev = "cuda" if shape["dtype"] == torch.bfloat16 else "cpu"
    c = Caches(layout, shape["slots"], shape["max_len"], shape["kv_heads"], shape["dim"], shape["dtype"], dev)
    n = 12
    pairs = random.sample([(s, p) for s in range(shape["slots"]) for p in range(shape["max_len"])], n)
    k = torch.randn(n, shape["kv_heads"], shape["dim"], device=dev).to(shape["dtype"])
    qkv = torch.randn(n, 5, shape["kv_heads"], shape["dim"], device=dev).to(shape["dtype"])
    v = qkv[:, 2]  # a strided view, as in the model (a slice of the fused qkv output)
    T.store_kv(k, v, c.k, c.v, torch.tensor([s for s, _ in pairs], device=dev),
               torch.tensor([p for _, p in pairs], device=dev), block_table=c.block_table)
    for i, (s, p) in enumerate(pairs):
        kk, vv = c.sequence(s, p + 1)
        assert torch.equal(kk[p], k[i]) and torch.equal(vv[p], v[i])


def test_wrappers_reject_bad_inputs():
    k = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match="same strides"):
        T.decode_attention(torch.zeros(1, 4, 16), k, torch.zeros(2, 8, 2, 16).transpose(1, 2).contiguous()
                           .transpose(1, 2), torch.tensor([0]), torch.tensor([1]), 1)
    with pytest.raises(ValueError, match="does not fit caches"):
        T.decode_attention(torch.zeros(1, 4, 8), k, k.clone(), torch.tensor([0]), torch.tensor([1]), 1)
    with pytest.raises(ValueError, match="must be \\[1\\]"):
        T.decode_attention(torch.zeros(1, 4, 16), k, k.clone(), torch.tensor([0, 1]), torch.tensor([1]), 1)
    with pytest.raises(ValueError, match="caches' dtype"):
        T.store_kv(torch.zeros(1, 2, 16, dtype=torch.float16), torch.zeros(1, 2, 16, dtype=torch.float16), k,
                   k.clone(), torch.tensor([0]), torch.tensor([0]))
