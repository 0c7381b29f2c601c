"""cuDNN's fused attention for long prefills (attention/cudnn_prefill.py). On the GPU (`gpu`
marker, with nvidia-cudnn-frontend installed): whole mixed steps through the backend against the
torch reference in float32, on fresh random slots, lengths and layouts, with q a strided view of a
fused projection as the model passes it. On the CPU: the bucket arithmetic and the errors a user
meets."""

import random

import pytest
import torch

from glakeserve.attention import cudnn_prefill, make_backend
from glakeserve.attention.torch_ref import TorchReferenceBackend
from test_triton_kernels import Caches

without_cudnn = pytest.mark.skipif(not cudnn_prefill.available(), reason="needs nvidia-cudnn-frontend")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 100, 1024, 1025, 4097])
@pytest.mark.parametrize("least", [1, 16, 1024])
def test_bucket_is_the_next_power_of_two(n, least):
    b = cudnn_prefill.bucket(n, least)
    assert b & (b - 1) == 0 and max(n, least) <= b < 2 * max(n, least)


def test_cudnn_backend_on_the_cpu_says_what_to_use():
    with pytest.raises(ValueError, match="needs a CUDA GPU.*--attention-backend torch"):
        make_backend("cudnn", torch.device("cpu"), 2)
    assert make_backend("auto", torch.device("cpu"), 2).name == "torch"


@pytest.mark.skipif(cudnn_prefill.available(), reason="nvidia-cudnn-frontend is installed here")
def test_a_missing_frontend_is_a_clear_error():
    with pytest.raises(ValueError, match="pip install --no-deps nvidia-cudnn-frontend.*--attention-backend triton"):
        cudnn_prefill.CudnnPrefill(torch.device("cpu"))


def fused_q(tokens, heads, kv_heads, dim):
    """q as the model passes it: the first heads of a [tokens, heads + 2 kv_heads, dim] projection."""
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    return qkv[:, :heads]


def check_step(backend, caches, heads, slots, qlen, ctx):
    """One step through the backend (NaN-poisoned output) against the float32 reference."""
    dev = torch.device("cuda")
    kv_heads, dim = caches.k.shape[-2:]
    meta = backend.prepare_metadata(slots, qlen, ctx, dev)
    q = fused_q(sum(qlen), heads, kv_heads, dim)
    out = torch.full((q.shape[0], heads, dim), float("nan"), dtype=q.dtype, device=dev)
    backend.forward(q, caches.k, caches.v, meta, out=out)
    ref = TorchReferenceBackend().forward(q.float(), caches.k.float(), caches.v.float(), meta)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0.02)


@pytest.mark.gpu
@without_cudnn
@pytest.mark.parametrize("layout", ["token-major", "per-layer"])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 128), (8, 8, 64)])
@pytest.mark.parametrize("trial", range(3))  # a fresh random draw each
def test_mixed_steps_against_the_reference(layout, heads, kv_heads, dim, trial):
    """Decode rows in front (they take the Triton decode kernel), then extend rows: one prompt from
    position 0, others after a cached prefix, slots in any order."""
    slots_n, max_len = 12, 2048
    caches = Caches(layout, slots_n, max_len, kv_heads, dim, torch.bfloat16, "cuda")
    backend = make_backend("cudnn", torch.device("cuda"), kv_heads)
    backend.prefill.min_query = 1  # every step with an extend row takes cuDNN here
    decodes, extends = random.randint(0, 3), random.randint(1, 6)
    slots = random.sample(range(slots_n), decodes + extends)
    ctx = [random.choice([1, 63, 64, 65, max_len - 1, max_len, random.randint(1, max_len)])
           for _ in slots]
    qlen = [1] * decodes + [random.randint(1, c) for c in ctx[decodes:]]
    qlen[decodes] = ctx[decodes]
    check_step(backend, caches, heads, slots, qlen, ctx)


@pytest.mark.gpu
@without_cudnn
def test_graphs_are_built_at_warm_up_and_reused():
    """Warm-up builds the buckets a model's steps select; steps inside them build nothing, and a
    step outside them builds one graph, counted as built while serving."""
    heads, kv_heads, dim, max_len = 8, 2, 64, 64
    caches = Caches("token-major", 20, max_len, kv_heads, dim, torch.bfloat16, "cuda")
    backend = make_backend("cudnn", torch.device("cuda"), kv_heads)
    p = backend.prefill
    p.min_query = 16
    backend.warm_up(caches.k, caches.v, heads, padding_slot=19)
    built = len(p.graphs)
    assert built > 0 and p.built_while_serving == 0
    for rows in (1, 3, 4, 8):  # row buckets warmed: 1, 2, 4, 8
        slots = random.sample(range(19), rows)
        ctx = [random.randint(17, max_len) for _ in slots]
        qlen = [random.randint(1, c) for c in ctx]
        qlen[0] = max(qlen[0], 16)
        check_step(backend, caches, heads, slots, qlen, ctx)
    assert len(p.graphs) == built and p.built_while_serving == 0
    slots = list(range(16))  # 16 rows: a bucket left to first use
    check_step(backend, caches, heads, slots, [20] * 16, [40] * 16)
    assert len(p.graphs) == built + 1 and p.built_while_serving == 1
    assert backend.stats() == {"cudnn_steps": 5, "cudnn_graphs": built + 1, "cudnn_graphs_built_while_serving": 1}
    backend.close()
    backend.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        check_step(backend, caches, heads, [0], [20], [40])
