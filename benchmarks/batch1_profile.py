"""Where a batch-1 decode token's time goes on the GPU: torch.profiler over a stretch of one
request's decode (llama-3-8b random bf16 weights, as engine_gpu.py's latency part), kernels grouped
by kind, the device's busy time against the wall time per token, and the gaps between kernels.

    python benchmarks/batch1_profile.py [--tokens 64] [--json out.json] [--cublas]

--cublas runs the baseline: one-token products through cuBLAS instead of our GEMV (model/gemv.py).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from glakeserve.llm import LLM
from glakeserve.model import llama
from glakeserve.sampling import SamplingParams
from report import close_llm, save_json

KINDS = [  # (kind, substrings of a kernel's name), first match wins
    ("gemm", ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "splitk")),
    ("attention", ("_decode_split", "_decode_combine", "_extend")),
    ("store_kv", ("_store_kv",)),
    ("norm", ("rms_norm", "add_rms")),
    ("rope", ("rope",)),
    ("silu_mul", ("silu",)),
    ("sampling", ("sample", "argmax", "softmax", "topk", "philox", "gumbel")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(union of the intervals' lengths, first start to last end), in the intervals' unit."""
    intervals.sort()
    busy, end = 0.0, float("-inf")
    for s, e in intervals:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, intervals[-1][1] - intervals[0][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json")
    ap.add_argument("--cublas", action="store_true", help="the baseline: one-token products through cuBLAS")
    args = ap.parse_args()
    llama.ONE_ROW_GEMV = not args.cublas
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=1024, max_num_seqs=1,
              kv_cache_memory=4 << 30)
    prompt = list(range(100, 132))
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate([prompt], greedy)  # warm-up
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([prompt], params)
    unprofiled = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params)
    close_llm(llm)

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kind = defaultdict(lambda: [0, 0.0])
    per_name = defaultdict(lambda: [0, 0.0])
    intervals = []
    for e in kernels:
        us = e.time_range.end - e.time_range.start
        intervals.append((e.time_range.start, e.time_range.end))
        per_kind[kind_of(e.name)][0] += 1
        per_kind[kind_of(e.name)][1] += us
        per_name[e.name][0] += 1
        per_name[e.name][1] += us
    busy, span = busy_and_span(intervals)
    n = args.tokens
    result = {"device": torch.cuda.get_device_name(), "one_row_products": "cublas" if args.cublas else "gemv",
              "tokens": n, "tok_s_unprofiled": n / unprofiled,
              "busy_us_per_token": busy / n, "span_us_per_token": span / n,
              "kinds": {k: {"kernels_per_token": c / n, "us_per_token": t / n} for k, (c, t) in per_kind.items()},
              "top": [{"name": k[:120], "count": c, "us_per_token": t / n}
                      for k, (c, t) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:20]]}
    print(f"{result['device']}, {result['one_row_products']}: {n / unprofiled:.1f} tok/s unprofiled; profiled: "
          f"device busy {busy / n:.0f} us a token over a span of {span / n:.0f} us ({100 * (1 - busy / span):.1f}% gaps)")
    for k, v in sorted(result["kinds"].items(), key=lambda kv: -kv[1]["us_per_token"]):
        print(f"  {k:10s} {v['us_per_token']:8.1f} us a token, {v['kernels_per_token']:6.1f} kernels")
    for row in result["top"]:
        print(f"  {row['us_per_token']:8.1f} us  x{row['count'] // n:<4d} {row['name']}")
    save_json(result, args.json)


if __name__ == "__main__":
    main()
