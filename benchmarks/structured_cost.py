"""What structured output costs: one batch of ShareGPT questions, all queued at once, run twice in
one engine: every request free, then half of them constrained to a JSON schema (xgrammar masks on
the device), then all free again. Reports total and output tokens/s of both and their ratio, and the engine's phases.

The schema asks for an array of at least 500 small objects, so a constrained request cannot end
before max_tokens: both runs generate the same number of tokens and the ratio is the cost of the
masks (and of the steps that are no longer overlapped while a constrained request runs), not of
shorter outputs. The free requests ignore EOS for the same reason.

    python benchmarks/structured_cost.py [--model llama-3-8b --load-format dummy] [--requests 256]
           [--max-output 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
from glakeserve.structured import GuidedDecoding
from report import close_llm, save_json
from shared_prefix import questions

SCHEMA = {"type": "object", "required": ["readings"], "properties": {"readings": {
    "type": "array", "minItems": 500, "items": {
        "type": "object", "required": ["id", "ok"],
        "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}}}}}}


def run(llm: LLM, prompts: list[list[int]], constrained: int, max_output: int) -> dict:
    """Requests 0, 2, 4, ... (the first `constrained` of them) follow the schema."""
    engine = llm.engine
    guided = GuidedDecoding("json", json.dumps(SCHEMA))
    params = []
    for i in range(len(prompts)):
        if i % 2 == 0 and i // 2 < constrained:
            params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=max_output, guided=guided))
        else:
            params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=max_output, ignore_eos=True))
    before = engine.stats()["phase_seconds"]
    t0 = time.monotonic()
    outs = llm.generate(prompts, params)
    elapsed = time.monotonic() - t0
    after = engine.stats()["phase_seconds"]
    out_tokens = sum(len(o.token_ids) for o in outs)
    short = sum(len(o.token_ids) < max_output for o in outs)
    return {"elapsed_s": elapsed, "requests": len(prompts), "constrained": constrained,
            "output_tokens": out_tokens, "ended_before_max_tokens": short,
            "total_tokens_per_s": (sum(map(len, prompts)) + out_tokens) / elapsed,
            "output_tokens_per_s": out_tokens / elapsed,
            "phase_seconds": {k: round(after[k] - before.get(k, 0.0), 3) for k in after}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-question", type=int, default=200)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--json")
    args = ap.parse_args()
    result = {"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    # no prefix caching: the runs repeat the same prompts, and a run must not find the last one's KV
    llm = LLM(args.model, load_format=args.load_format, max_model_len=args.max_model_len,
              max_num_seqs=args.requests, enable_prefix_caching=False)
    prompts = questions(llm.tokenizer, args.requests + 8, args.max_question)
    run(llm, prompts[:8], 4, 16)  # warm-up: kernels, graphs and the schema's grammar compile here
    prompts = prompts[8:]
    free = run(llm, prompts, 0, args.max_output)  # free, constrained, free again: drift shows as two baselines
    mixed = run(llm, prompts, len(prompts) // 2, args.max_output)
    again = run(llm, prompts, 0, args.max_output)
    base = (free["total_tokens_per_s"] + again["total_tokens_per_s"]) / 2
    result.update(free=free, half_json_schema=mixed, free_again=again, ratio=mixed["total_tokens_per_s"] / base)
    for name, r in (("all free", free), ("half json_schema", mixed), ("all free again", again)):
        print(f"{name:17s}: {r['total_tokens_per_s']:,.0f} total tok/s, {r['output_tokens_per_s']:,.0f} output tok/s, "
              f"{r['output_tokens']} output tokens ({r['ended_before_max_tokens']} requests ended early), "
              f"{r['elapsed_s']:.2f} s", flush=True)
    print(f"half json_schema / all free (mean of both): {result['ratio']:.3f}x")
    close_llm(llm)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
