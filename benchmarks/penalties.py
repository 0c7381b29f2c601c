"""What applying penalties costs on the GPU: peak extra memory and time of PenaltyRows.apply over
a [rows, vocab] batch (llama-3's 128,256-token vocabulary), in row chunks (the engine's default)
against all rows at once (the baseline, chunk_elements = rows x vocab), same run.

    python benchmarks/penalties.py [--rows 256] [--vocab 128256] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
import triton

from glakeserve.penalties import CHUNK_ELEMENTS, PenaltyRows
from glakeserve.sampling import SamplingParams
from report import save_json


def measure(rows: int, vocab: int, chunk_elements: int) -> dict:
    dev = torch.device("cuda")
    pen = PenaltyRows(list(range(rows)), torch.randint(0, 3, (rows, vocab), dtype=torch.int32, device=dev),
                      torch.rand(rows, vocab, device=dev) < 0.01)
    params = [SamplingParams(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3)] * rows
    logits = torch.randn(rows, vocab, device=dev)

    def to_device(values, dtype):
        return torch.tensor(values, dtype=dtype, device=dev)

    pen.apply(logits, params, to_device, chunk_elements)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pen.apply(logits, params, to_device, chunk_elements)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(lambda: pen.apply(logits, params, to_device, chunk_elements), return_mode="median")
    return {"rows": rows, "vocab": vocab, "chunk_elements": chunk_elements, "peak_extra_MiB": peak / 2**20, "ms": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--json")
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "runs": []}
    for label, chunk in (("chunked (default)", CHUNK_ELEMENTS), ("all rows at once", args.rows * args.vocab)):
        r = measure(args.rows, args.vocab, chunk)
        r["label"] = label
        result["runs"].append(r)
        print(f"{label:18s} rows={args.rows} vocab={args.vocab}: peak extra {r['peak_extra_MiB']:.0f} MiB, "
              f"{r['ms']:.3f} ms", flush=True)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
