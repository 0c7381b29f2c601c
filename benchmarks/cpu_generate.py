"""SmolLM2-135M-Instruct on this machine's CPU: our engine against HF transformers `generate`, in
the same run, same weights (float32), greedy, EOS ignored so both make every token.

  1. batch 1: decode tokens/s (first token excluded), 128 new tokens after a short prompt, best of
     three runs each, ours and HF interleaved;
  2. 16 ShareGPT prompts (vLLM's sampling rules, seed 0, outputs capped at --max-output):
     total tokens/s = (prompt + output tokens) / wall time. HF runs them as one left-padded batch
     with max_new_tokens = the longest output, counting only the tokens asked for (vLLM's HF
     baseline does the same).

    python benchmarks/cpu_generate.py [--max-output 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glakeserve.datasets import sample_sharegpt
from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
from report import save_json

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class TokenClock:
    """A HF streamer that only notes when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_batch1(hf, ids: list[int], new: int) -> float:
    clock = TokenClock()
    with torch.no_grad():
        hf.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock,
                    pad_token_id=2, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    t = clock.times[1:]  # [0] is the prompt itself
    return (len(t) - 1) / (t[-1] - t[0])


def ours_batch1(llm: LLM, ids: list[int], new: int) -> float:
    times = []
    for out in llm.generate_stream([ids], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def hf_batch(hf, tok, reqs) -> float:
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 2
    longest = max(r.prompt_len for r in reqs)
    ids = torch.tensor([[pad] * (longest - r.prompt_len) + r.prompt_token_ids for r in reqs])
    mask = torch.tensor([[0] * (longest - r.prompt_len) + [1] * r.prompt_len for r in reqs])
    new = max(r.output_len for r in reqs)
    t0 = time.perf_counter()
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
    return time.perf_counter() - t0


def ours_batch(llm: LLM, reqs) -> float:
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    llm.generate([r.prompt_token_ids for r in reqs], params)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128, help="batch-1 decode length")
    ap.add_argument("--json")
    args = ap.parse_args()

    from transformers import AutoTokenizer, LlamaForCausalLM

    llm = LLM(max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=2048)
    path = llm.engine.source.path
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    reqs = sample_sharegpt(llm.tokenizer, 16, seed=0)
    reqs = [type(r)(r.prompt, r.prompt_token_ids, min(r.output_len, args.max_output)) for r in reqs]
    tokens = sum(r.prompt_len + r.output_len for r in reqs)

    ours_batch1(llm, ids, 8)  # warm-up, both
    hf_batch1(hf, ids, 8)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    ours, theirs = [], []
    for _ in range(3):  # interleaved, best of three: this 2-core VM is noisy
        ours.append(ours_batch1(llm, ids, args.new_tokens))
        theirs.append(hf_batch1(hf, ids, args.new_tokens))
    result["batch1_decode_tok_s_ours"] = max(ours)
    result["batch1_decode_tok_s_hf"] = max(theirs)
    result["batch1_runs_ours"], result["batch1_runs_hf"] = ours, theirs
    result["batch1_ratio"] = result["batch1_decode_tok_s_ours"] / result["batch1_decode_tok_s_hf"]
    t_ours = ours_batch(llm, reqs)
    t_hf = hf_batch(hf, tok, reqs)
    result.update({
        "batch16_tokens": tokens,
        "batch16_prompt_lens": [r.prompt_len for r in reqs],
        "batch16_output_lens": [r.output_len for r in reqs],
        "batch16_total_tok_s_ours": tokens / t_ours,
        "batch16_total_tok_s_hf": tokens / t_hf,
        "batch16_ratio": t_hf / t_ours,
        "batch16_preemptions_ours": llm.engine.stats()["preemptions"],
    })
    print(json.dumps(result, indent=2))
    save_json(result, args.json)


if __name__ == "__main__":
    main()
