"""Attention kernels on the GPU, each beside its same-run ceiling or baseline:

  decode   achieved GB/s (K and V bytes read) against the device's copy bandwidth measured here;
           Llama-2-7B (32 KV heads) and Llama-3-8B (8 KV heads) head shapes, batch 1..256, context
           512..8192; vTensor caches in every layout (real VMM memory, mapped) and the paged baseline
  prefill  TFLOP/s of our extend kernels (each usable one, and cuDNN's through the cudnn backend where
           nvidia-cudnn-frontend is installed) against torch's scaled_dot_product_attention (causal);
           "ours" is what the engine's default backend runs at that shape

    python benchmarks/kernels.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import triton

from glakeserve.attention import cudnn_prefill, make_backend
from glakeserve.attention import triton_ops as ops
from glakeserve.kv import VTensorKVCache
from glakeserve.kv.vtensor_cache import default_page_size
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.request import Request, RequestMetrics
from glakeserve.sampling import SamplingParams
from glakeserve.scheduler import ScheduledBatch
from glakeserve.vtensor import PagePool
from report import save_json

HEADS = {"llama-2-7b": DUMMY_SHAPES["llama-2-7b"], "llama-3-8b": DUMMY_SHAPES["llama-3-8b"]}
MAX_BYTES = 36 << 30  # skip points whose cache would not fit beside everything else


def bench(fn) -> float:
    """Median seconds of fn, CUDA-event timed after warm-up (triton's do_bench)."""
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e9


def vtensor_caches(cfg, layout, batch, ctx):
    """K/V views of layer 0 over real mapped VMM pages, `ctx` tokens mapped in each of `batch`
    slots (exactly: no look-ahead), at the page size the engine picks. Per-layer needs only layer
    0's vTensors, so it is built for a one-layer model; token-major keeps every layer (the stride
    depends on it). Returns the views and the slot ids the requests were given."""
    from dataclasses import replace

    c = replace(cfg, num_layers=1) if layout == "per-layer" else cfg
    per_token = c.num_kv_heads * c.head_dim * 2 * (1 if layout == "per-layer" else 2 * c.num_layers)
    page = default_page_size(per_token, 2 << 20, host=False)
    per_block = 2 if layout == "per-layer" else 1
    blocks = -(-ctx * per_token // page)
    pool = PagePool((batch + 1) * blocks * per_block + per_block, page_size=page, backend="cuda")
    kv = VTensorKVCache(pool, c, torch.bfloat16, ctx, batch, layout=layout, prefix_caching=False, lookahead_tokens=0,
                        owns_pool=True)
    reqs = [Request(f"r{i}", [1] * ctx, SamplingParams(), 0, RequestMetrics(0.0), 1) for i in range(batch)]
    for r in reqs:
        assert kv.admit(r) and kv.reserve(r, ctx)
        r.num_computed_tokens = ctx
    kv.begin_step(ScheduledBatch(requests=reqs, num_new_tokens=[ctx] * batch, starts=[0] * batch))  # maps done
    slots = torch.tensor([r.slot.index for r in reqs], device="cuda")
    k, v = kv.k_cache(0), kv.v_cache(0)
    for cache in (k, v):  # only the mapped part: the rest is not backed (an illegal address)
        if cache.dim() == 5:  # page-major: [slot, page, pos_in_page, ...]; ctx is a multiple of a page here
            pages = ctx // cache.shape[2]
            cache[slots, :pages] = torch.randn(batch, pages, *cache.shape[2:], dtype=torch.bfloat16, device="cuda")
        else:
            cache[slots, :ctx] = torch.randn(batch, ctx, c.num_kv_heads, c.head_dim, dtype=torch.bfloat16, device="cuda")
    return (k, v, None, slots), kv


def paged_caches(cfg, batch, ctx):
    blocks = batch * ctx // 16
    shape = (blocks, 16, cfg.num_kv_heads, cfg.head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(blocks, device="cuda").view(batch, ctx // 16).to(torch.int32)
    return (k, v, table, torch.arange(batch, device="cuda")), None


def decode_point(cfg, layout, batch, ctx, splits_for, block_n: int = 32) -> dict | None:
    kv_bytes = batch * ctx * 2 * cfg.num_kv_heads * cfg.head_dim * 2  # K and V of one layer, bf16
    alloc = batch * ctx * (2 * cfg.num_kv_heads * cfg.head_dim * 2 if layout == "per-layer"
                           else cfg.kv_bytes_per_token * 2)
    if alloc > MAX_BYTES:
        return None
    (k, v, table, slots), owner = (paged_caches(cfg, batch, ctx) if layout == "paged"
                                   else vtensor_caches(cfg, layout, batch, ctx))
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
    lens = torch.full((batch,), ctx, device="cuda")
    splits = splits_for(batch)
    scratch = ops.decode_scratch(batch, cfg.num_heads, cfg.head_dim, splits, "cuda")
    out = torch.empty_like(q)
    t = bench(lambda: ops.decode_attention(q, k, v, slots, lens, splits, out=out, scratch=scratch, block_table=table,
                                           block_n=block_n))
    if owner is not None:
        owner.close()
    del k, v, table
    torch.cuda.empty_cache()
    return {"layout": layout, "batch": batch, "context": ctx, "splits": splits, "block_n": block_n, "us": t * 1e6,
            "GBps": kv_bytes / t / 1e9}


PREFILL_CONFIGS = [  # (block_m, block_n, num_warps, num_stages); the first: the wrapper's defaults
    (None, None, None, 3), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3),
    (64, 128, 4, 3),
    (128, 32, 4, 4), (128, 64, 8, 4)]


def prefill_point(batch, heads, kv_heads, seq, dim=128, sweep=False, layout="contiguous") -> dict:
    """Every usable extend kernel (tiles of PREFILL_CONFIGS: the first only, all with sweep) against
    SDPA. layout "contiguous": K/V [batch, seq, kv_heads, dim]; "token-major": the engine's slots,
    each token's K and V of all 32 layers together (layer 1's view, positions 128 KiB apart)."""
    q = torch.randn(batch * seq, heads, dim, dtype=torch.bfloat16, device="cuda")
    if layout == "token-major":
        base = torch.randn(batch, seq, 32, 2, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        k, v = base[:, :, 1, 0], base[:, :, 1, 1]
    else:
        k = torch.randn(batch, seq, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
    lens = torch.full((batch,), seq, device="cuda")
    starts = torch.arange(0, batch * seq + 1, seq, device="cuda")
    slots = torch.arange(batch, device="cuda")
    configs = PREFILL_CONFIGS if sweep else PREFILL_CONFIGS[:1]
    kernels = ops.extend_kernels(q, k, False, 1)
    times = {}
    for kernel in kernels:
        for bm, bn, w, st in configs:
            try:
                times[(kernel, bm, bn, w, st)] = bench(lambda: ops.extend_attention(
                    q, k, v, slots, starts, lens, lens, seq, block_m=bm, block_n=bn, num_warps=w, num_stages=st,
                    kernel=kernel))
            except Exception as e:  # a config that does not fit (shared memory): skip it
                print(f"  {kernel} {(bm, bn, w, st)} failed: {type(e).__name__}", flush=True)
    triton_default = (kernels[0],) + PREFILL_CONFIGS[0]  # what the triton backend runs
    default = triton_default
    if cudnn_prefill.available():  # the cudnn backend, through its own dispatch, as the engine calls it
        backend = make_backend("cudnn", torch.device("cuda"), kv_heads)
        meta = backend.prepare_metadata(list(range(batch)), [seq] * batch, [seq] * batch, torch.device("cuda"))
        out = torch.empty_like(q)
        times[("cudnn", None, None, None, None)] = bench(lambda: backend.forward(q, k, v, meta, out=out))
        if backend.prefill.wanted(q, k, meta):
            default = ("cudnn", None, None, None, None)
        backend.close()  # its cuDNN handle
    if default not in times:  # a bug to fix, but the other figures still tell something
        print(f"  the engine's extend kernel and tiles {default} FAILED at this shape", flush=True)
    ours = times.get(default, float("nan"))
    # SDPA on K/V expanded to every head: the flash path, its fastest (GQA would fall back)
    qs = q.view(batch, seq, heads, dim).transpose(1, 2)
    ks = k.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
    vs = v.repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
    sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    flops = 4 * batch * heads * seq * seq * dim / 2  # causal: half the score matrix
    best = min(times, key=times.get)
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "seq": seq, "layout": layout,
            "ours_TFLOPs": flops / ours / 1e12, "config": list(default),
            "triton_TFLOPs": flops / times.get(triton_default, float("nan")) / 1e12, "best_TFLOPs": flops / times[best] / 1e12,
            "best_config": list(best), "sdpa_TFLOPs": flops / sdpa / 1e12, "ratio": sdpa / ours,
            "all_configs_TFLOPs": {str(c): flops / t / 1e12 for c, t in times.items()}}


def decode_sweep(sms: int) -> list[dict]:
    """Small batches are latency-bound: a token-major tile of 64 keys spans four 2 MiB pages (a
    layer's tokens lie 128 KiB apart). Shorter tiles and more splits put more loads in flight."""
    cfg = HEADS["llama-3-8b"]
    rows = []
    for b, ctx in ((1, 256), (1, 1024), (1, 4096), (4, 1024), (16, 1024), (16, 4096), (64, 1024)):
        base = max(1, min(16, -(-2 * sms // (b * cfg.num_kv_heads))))
        (k, v, _, slots), owner = vtensor_caches(cfg, "token-major", b, ctx)
        q = torch.randn(b, cfg.num_heads, cfg.head_dim, dtype=torch.bfloat16, device="cuda")
        lens = torch.full((b,), ctx, device="cuda")
        out = torch.empty_like(q)
        for block_n, splits in ((64, base), (32, base), (16, base), (16, 2 * base), (32, 2 * base)):
            scratch = ops.decode_scratch(b, cfg.num_heads, cfg.head_dim, splits, "cuda")
            t = bench(lambda: ops.decode_attention(q, k, v, slots, lens, splits, out=out, scratch=scratch,
                                                   block_n=block_n))
            gbps = b * ctx * 2 * cfg.num_kv_heads * cfg.head_dim * 2 / t / 1e9
            rows.append({"batch": b, "context": ctx, "block_n": block_n, "splits": splits, "us": t * 1e6,
                         "GBps": gbps})
            print(f"decode-sweep B={b:<3d} ctx={ctx:<5d} block_n={block_n:<3d} splits={splits:<3d} "
                  f"{t * 1e6:7.1f} us {gbps:6.0f} GB/s", flush=True)
        owner.close()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="only the headline points")
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="try several prefill tile configurations")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="token-major decode, llama-3-8b heads: key tile height and split count at small batches")
    args = ap.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_bandwidth(), "decode": {}, "prefill": []}
    print(f"copy bandwidth (read + write): {result['copy_GBps']:.0f} GB/s", flush=True)
    batches = [64] if args.quick else [1, 16, 64, 256]
    contexts = [4096] if args.quick else [512, 2048, 4096, 8192]
    for name, cfg in ({} if args.prefill_only else HEADS).items():
        def splits_for(b, kvh=cfg.num_kv_heads):
            return max(1, min(16, -(-2 * sms // (b * kvh))))

        rows = []
        for layout in ("per-layer", "token-major", "page-major", "paged"):
            for b in batches:
                for ctx in contexts:
                    r = decode_point(cfg, layout, b, ctx, splits_for)
                    if r is None:
                        continue
                    r["of_copy"] = r["GBps"] / result["copy_GBps"]
                    rows.append(r)
                    print(f"decode {name:10s} {layout:11s} B={b:<3d} ctx={ctx:<5d} {r['us']:8.1f} us "
                          f"{r['GBps']:7.0f} GB/s ({100 * r['of_copy']:.0f}% of copy)", flush=True)
        result["decode"][name] = rows
    if args.decode_sweep:
        result["decode_sweep"] = decode_sweep(sms)
    for b, h, kvh, s, layout in [(8, 32, 32, 2048, "contiguous"), (8, 32, 8, 2048, "contiguous"),
                                 (2, 32, 8, 8192, "contiguous"), (8, 32, 8, 2048, "token-major"),
                                 (16, 32, 8, 512, "token-major")]:  # the last: below cuDNN's threshold
        r = prefill_point(b, h, kvh, s, sweep=args.sweep, layout=layout)
        result["prefill"].append(r)
        print(f"prefill B={b} H={h} KVH={kvh} S={s} {layout}: ours {r['ours_TFLOPs']:.0f} TFLOP/s "
              f"(triton {r['triton_TFLOPs']:.0f}) "
              f"(default {r['config']}; best {r['best_TFLOPs']:.0f} by {r['best_config']}), "
              f"SDPA {r['sdpa_TFLOPs']:.0f} TFLOP/s ({100 * r['ours_TFLOPs'] / r['sdpa_TFLOPs']:.0f}%)", flush=True)
        print("  " + json.dumps({k: round(v) for k, v in r["all_configs_TFLOPs"].items()}), flush=True)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
