"""One-token linear layers at Llama-3-8B's shapes: cuBLAS (torch.mm, as Linear runs them, and
torch.mv) against our Triton GEMV (glakeserve/model/gemv.py) over a few tilings, in GB/s of weight
read, beside the device's copy bandwidth measured in the same run.

    python benchmarks/gemv.py [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
import triton

from glakeserve.model.gemv import gemv
from report import save_json

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [(8, 512, 4, 3), (16, 512, 4, 1), (8, 1024, 4, 1), (32, 256, 4, 1), (16, 256, 4, 3), (4, 1024, 4, 1),
           (32, 512, 8, 1)]  # (block_n, block_k, num_warps, num_stages); the first: gemv()'s defaults


def bench(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50) / 1e3  # in a graph, as decode steps run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy = 2 * a.numel() / bench(lambda: b.copy_(a)) / 1e9
    del a, b
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy, "shapes": {}}
    print(f"{result['device']}: copy {copy:.0f} GB/s (read + write)")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
        ref = (x.float() @ w.float().t())
        times = {"torch.mm": bench(lambda: torch.mm(x, w.t(), out=out)),
                 "torch.mv": bench(lambda: torch.mv(w, x[0], out=out[0]))}
        for bn, bk, nw, ns in CONFIGS:
            got = gemv(x, w, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
            err = (got.float() - ref).abs().max().item()
            times[f"gemv{(bn, bk, nw, ns)}"] = bench(lambda: gemv(x, w, out=out, block_n=bn, block_k=bk,
                                                                   num_warps=nw, num_stages=ns))
            if err > 0.05 * ref.abs().max().item():
                print(f"  {name} gemv{(bn, bk, nw, ns)} WRONG: max error {err}")
        gbps = {kk: w.numel() * 2 / t / 1e9 for kk, t in times.items()}
        result["shapes"][name] = {"n": n, "k": k, "us": {kk: t * 1e6 for kk, t in times.items()}, "GBps": gbps}
        best = min(times, key=times.get)
        print(f"{name:8s} [{n}x{k}] " + "  ".join(f"{kk} {t * 1e6:.1f}us" for kk, t in times.items())
              + f"  | best {best} {gbps[best]:.0f} GB/s vs torch.mm {gbps['torch.mm']:.0f}", flush=True)
        del w
    save_json(result, args.json)


if __name__ == "__main__":
    main()
