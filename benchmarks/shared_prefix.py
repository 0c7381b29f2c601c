"""A shared system prompt: N requests whose prompts start with the same long system prompt (2,000
tokens by default) and end in their own ShareGPT question, all queued at once; prefix caching on
against off in the same run. Reports mean and median TTFT, total tokens/s, the tokens the cache
served, and how the hits were served (aliased blocks; driver calls on the engine's thread).

    python benchmarks/shared_prefix.py [--model llama-3-8b --load-format dummy] [--requests 256]
           [--system-tokens 2000] [--max-output 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from glakeserve.datasets import load_conversations
from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
from report import close_llm, save_json


def questions(tok, count: int, max_len: int) -> list[list[int]]:
    out = []
    for conv in load_conversations():
        if conv and conv[0][0] == "human":
            ids = tok.encode(conv[0][1], add_special_tokens=False)[:max_len]
            if len(ids) >= 4:
                out.append(ids)
        if len(out) == count:
            break
    return out


def run(llm: LLM, system: list[int], qs: list[list[int]], max_output: int) -> dict:
    engine = llm.engine
    before = engine.stats()
    t0 = time.monotonic()
    ids = [engine.add_request(system + q, SamplingParams(temperature=0, max_tokens=max_output, ignore_eos=True),
                              arrival_time=t0, stream=False) for q in qs]
    ttft, out_tokens = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                ttft[o.request_id] = o.metrics.ttft
                out_tokens += len(o.token_ids)
    elapsed = time.monotonic() - t0
    after = engine.stats()
    pc, pc0 = after["prefix_cache"], before["prefix_cache"]
    t = [1e3 * ttft[i] for i in ids]
    return {"elapsed_s": elapsed, "mean_ttft_ms": statistics.mean(t), "median_ttft_ms": statistics.median(t),
            "total_tokens_per_s": (sum(len(system) + len(q) for q in qs) + out_tokens) / elapsed,
            "hit_tokens": pc["hit_tokens"] - pc0["hit_tokens"] if pc else 0,
            "aliased_blocks": pc["aliased_blocks"] - pc0["aliased_blocks"] if pc else 0,
            "engine_driver_calls": after["engine_driver_calls"] - before["engine_driver_calls"],
            "mapping_waits": after["mapping_waits"] - before["mapping_waits"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--max-question", type=int, default=200)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--json")
    args = ap.parse_args()
    result = {"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for caching in (True, False):
        llm = LLM(args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                  enable_prefix_caching=caching)
        tok = llm.tokenizer
        rng = random.Random(0)
        vocab = llm.engine.model_config.vocab_size
        qs = questions(tok, args.requests + 8, args.max_question)
        # warm-up on another system prompt: compiles and first uses land in neither measured run
        run(llm, [rng.randrange(vocab) for _ in range(args.system_tokens)], qs[:8], 8)
        llm.engine.drop_cached_kv()
        system = [rng.randrange(vocab) for _ in range(args.system_tokens)]
        r = run(llm, system, qs[8:], args.max_output)
        result["on" if caching else "off"] = r
        print(f"prefix caching {'on ' if caching else 'off'}: mean TTFT {r['mean_ttft_ms']:.1f} ms (median "
              f"{r['median_ttft_ms']:.1f}), {r['total_tokens_per_s']:.0f} total tok/s, {r['hit_tokens']} tokens from "
              f"the cache, {r['aliased_blocks']} blocks aliased, engine-thread driver calls "
              f"{r['engine_driver_calls']}, waits {r['mapping_waits']}", flush=True)
        close_llm(llm)
    result["ttft_speedup"] = result["off"]["mean_ttft_ms"] / result["on"]["mean_ttft_ms"]
    result["throughput_ratio"] = result["on"]["total_tokens_per_s"] / result["off"]["total_tokens_per_s"]
    print(f"shared system prompt: mean TTFT {result['ttft_speedup']:.2f}x lower with prefix caching; throughput "
          f"{result['throughput_ratio']:.2f}x", flush=True)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
