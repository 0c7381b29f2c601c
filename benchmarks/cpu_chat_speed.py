"""What a chat user feels on this CPU: batch-1 decode tokens/s and prompt (prefill) tokens/s of the
embedded SmolLM2-135M-Instruct, ours beside llama.cpp on the same GGUF file, in the same run.

  ours, float32      load_format auto: the GGUF dequantized to float32 (what LLM() loads)
  ours, gguf         load_format gguf: the file's Q4_1 tensors as int4 (the chat's CPU default)
  llama.cpp          llama-cpp-python on the same .gguf, as many threads as torch uses

Decode: 128 new tokens after a short chat prompt, EOS ignored, first token excluded; prompt: a
~500-token prompt prefilled from an empty cache (prefix caching off; llama.cpp reset), time to the
first token. Best of three runs of each, the three engines interleaved (the VM is noisy).

llama.cpp is an optional benchmark dependency, never a runtime one: install it into the venv with
    .venv/bin/pip install llama-cpp-python==0.3.36
(it builds llama.cpp from source: several minutes on 2 cores). Without it the script measures ours
alone and says so.

    python benchmarks/cpu_chat_speed.py [--new-tokens 128] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from glakeserve.llm import LLM
from glakeserve.model.loader import default_gguf_path
from glakeserve.sampling import SamplingParams
from report import save_json

CHAT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LONG = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from wine-making. ") * 12 + \
       "\nSummarise the paragraph above in one sentence."


class Ours:
    def __init__(self, load_format: str):
        self.name = f"ours ({load_format})"
        self.llm = LLM(max_model_len=2048, max_num_seqs=1, kv_cache_memory=256 << 20, load_format=load_format,
                       enable_prefix_caching=False)
        self.model = self.llm.engine.model_name

    def chat_text(self, text: str) -> str:
        return self.llm.tokenizer.chat_prompt([{"role": "user", "content": text}])

    def ids(self, prompt: str) -> list[int]:
        return self.llm.tokenizer.encode(prompt, add_special_tokens=False)  # the template wrote them

    def decode(self, ids: list[int], new: int) -> float:
        times = []
        for _ in self.llm.generate_stream([ids], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)):
            times.append(time.perf_counter())
        return (len(times) - 1) / (times[-1] - times[0])

    def prefill(self, ids: list[int]) -> float:
        out = self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=1))[0]
        return len(ids) / (out.metrics.first_token_time - out.metrics.arrival_time)

    def text(self, ids: list[int], new: int) -> str:
        return self.llm.generate([ids], SamplingParams(temperature=0, max_tokens=new))[0].text


class LlamaCpp:
    def __init__(self, threads: int):
        from llama_cpp import Llama, __version__

        self.name = "llama.cpp"
        self.version = __version__
        self.llm = Llama(model_path=str(default_gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                         n_batch=512, verbose=False)
        self.model = default_gguf_path().name

    def ids(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def decode(self, ids: list[int], new: int) -> float:
        self.llm.reset()
        times = []
        for _ in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new:
                break
        return (len(times) - 1) / (times[-1] - times[0])

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)

    def text(self, ids: list[int], new: int) -> str:
        out = []
        for tok in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if tok == self.llm.token_eos() or len(out) == new:
                break
            out.append(tok)
        return self.llm.detokenize(out).decode(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    threads = torch.get_num_threads()
    load_before = os.getloadavg()  # other processes on the machine: the figures only mean something when low
    engines = [Ours("auto"), Ours("gguf")]
    try:
        engines.append(LlamaCpp(threads))
    except ImportError:
        print("llama-cpp-python is not installed: measuring ours alone (see this script's docstring)")
    chat, long = engines[0].chat_text(CHAT), engines[0].chat_text(LONG)  # the same text for every engine
    prompts = {e.name: (e.ids(chat), e.ids(long)) for e in engines}
    for e in engines:  # warm-up: first-use costs, oneDNN kernels for these shapes
        e.decode(prompts[e.name][0], 8)
        e.prefill(prompts[e.name][1])
    decode = {e.name: [] for e in engines}
    prefill = {e.name: [] for e in engines}
    for _ in range(args.runs):
        for e in engines:
            decode[e.name].append(e.decode(prompts[e.name][0], args.new_tokens))
            prefill[e.name].append(e.prefill(prompts[e.name][1]))
    result = {"threads": threads, "torch": torch.__version__, "new_tokens": args.new_tokens,
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}, "engines": {}}
    for e in engines:
        result["engines"][e.name] = {
            "model": e.model, "decode_tok_s": max(decode[e.name]), "decode_runs": decode[e.name],
            "prompt_tokens": len(prompts[e.name][1]), "prompt_tok_s": max(prefill[e.name]),
            "prompt_runs": prefill[e.name], "sample": e.text(prompts[e.name][0], 24),
        }
        if isinstance(e, LlamaCpp):
            result["engines"][e.name]["version"] = e.version
    base = result["engines"].get("llama.cpp")
    print(f"{'engine':<16} {'decode tok/s':>13} {'prompt tok/s':>13}" + ("   vs llama.cpp" if base else ""))
    for name, r in result["engines"].items():
        ratio = f"   {r['decode_tok_s'] / base['decode_tok_s']:.2f}x / {r['prompt_tok_s'] / base['prompt_tok_s']:.2f}x" \
            if base else ""
        print(f"{name:<16} {r['decode_tok_s']:>13.1f} {r['prompt_tok_s']:>13.1f}{ratio}")
    print(json.dumps(result, indent=2))
    save_json(result, args.json)


if __name__ == "__main__":
    main()
