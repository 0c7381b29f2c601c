"""Would CUDA graphs for mixed prefill+decode steps pay? A graph removes the device's idle time
*inside* a step (kernels waiting for the host to launch them), never the kernels' own time. This
measures both, per step, for eager mixed steps and decode-graph steps alike.

ShareGPT prompts (vLLM's sampling, seed 0), llama-3-8b random bf16 weights, every request queued at
t=0 as in engine_gpu.py. After a warm-up, a window of steps runs under torch.profiler, each step
between two device synchronisations, so the kernels that start inside a step's host range are its
own. Per step: kernels launched, the union of their device intervals (busy), first start to last
end (span), and span - busy (the gaps a graph could close).

    python benchmarks/step_gaps.py --num-prompts 600 --warmup-steps 30 --steps 120 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from glakeserve.datasets import sample_sharegpt
from glakeserve.llm import LLM
from glakeserve.model.loader import _default_tokenizer_dir
from glakeserve.sampling import SamplingParams
from glakeserve.tokenizer import Tokenizer
from report import close_llm, save_json


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals (µs): overlapping kernels count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def per_step(prof, ranges: list[tuple[int, str]]) -> list[dict]:
    """Kernels grouped by the host range of the step they started in."""
    spans = {}
    kernels = []
    for e in prof.events():
        if e.device_type == DeviceType.CPU and e.name.startswith("glake_step_"):
            spans[int(e.name.rsplit("_", 1)[1])] = (e.time_range.start, e.time_range.end)
        elif e.device_type == DeviceType.CUDA and not e.name.startswith("glake_step_"):
            kernels.append((e.time_range.start, e.time_range.end))
    rows = []
    for i, path in ranges:
        lo, hi = spans[i]
        mine = [(a, b) for a, b in kernels if lo <= a <= hi]
        if not mine:
            continue
        span = max(b for _, b in mine) - min(a for a, _ in mine)
        busy = union_length(mine)
        rows.append({"step": i, "path": path, "kernels": len(mine), "span_us": span, "busy_us": busy,
                     "gap_us": span - busy, "host_us": hi - lo})
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for path in sorted({r["path"] for r in rows}):
        mine = [r for r in rows if r["path"] == path]
        n = len(mine)
        span, busy = sum(r["span_us"] for r in mine), sum(r["busy_us"] for r in mine)
        out[path] = {"steps": n, "kernels_per_step": sum(r["kernels"] for r in mine) / n,
                     "span_ms_per_step": span / n / 1e3, "busy_ms_per_step": busy / n / 1e3,
                     "gap_ms_per_step": (span - busy) / n / 1e3, "gap_fraction": (span - busy) / span,
                     "host_ms_per_step": sum(r["host_us"] for r in mine) / n / 1e3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--graph-tokens", type=int, default=None,
                    help="the engine's cuda_graph_max_tokens (default: piecewise graphs on; 0: mixed steps eager)")
    ap.add_argument("--json")
    args = ap.parse_args()

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=2048, max_num_seqs=args.max_num_seqs,
              async_scheduling=False, cuda_graph_max_tokens=args.graph_tokens)
    eng = llm.engine
    reqs = sample_sharegpt(Tokenizer(_default_tokenizer_dir()), args.num_prompts, seed=0)  # as engine_gpu.py
    for r in reqs:
        eng.add_request(r.prompt_token_ids, SamplingParams(temperature=1.0, max_tokens=r.output_len, ignore_eos=True))
    for _ in range(args.warmup_steps):
        eng.step()
    ranges = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            if not eng.has_unfinished_requests():
                break
            torch.cuda.synchronize()
            with record_function(f"glake_step_{i}"):
                eng.step()
                torch.cuda.synchronize()
            ranges.append((i, eng.last_path))
    rows = per_step(prof, ranges)
    result = {"device": torch.cuda.get_device_name(), "model": args.model, "max_num_seqs": args.max_num_seqs,
              "by_path": summarise(rows), "steps": rows}
    close_llm(llm)
    print(json.dumps(result["by_path"], indent=1))
    save_json(result, args.json)


if __name__ == "__main__":
    main()
