"""Multi-turn chat replay from ShareGPT conversations, prefix caching on against off in the same run.

Each conversation's turn t prompt = turn t-1's prompt + the reply the engine generated + the next
user message (ChatML separators, as the chat template writes them), built at token level so both
settings see exactly the same tokens. Conversations run concurrently; within one, a turn is sent
when the previous one finishes. Greedy, EOS ignored, reply lengths from the dataset (capped).

    python benchmarks/multiturn.py [--model llama-3-8b --load-format dummy] [--conversations 64]
           [--turns 4] [--concurrency 16] [--max-output 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glakeserve.datasets import load_conversations
from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
from report import close_llm, save_json


def pick(tok, count: int, turns: int, max_user: int, max_output: int) -> list[list[tuple[list[int], int]]]:
    """count conversations with >= `turns` user turns: per turn (user message token ids, reply length)."""
    out = []
    for conv in load_conversations():
        users = [(conv[i][1], conv[i + 1][1]) for i in range(0, len(conv) - 1, 2)
                 if conv[i][0] == "human" and conv[i + 1][0] == "gpt"]
        if len(users) < turns:
            continue
        turns_ids = []
        for user, reply in users[:turns]:
            ids = tok.encode(user, add_special_tokens=False)[:max_user]
            turns_ids.append((ids, max(4, min(max_output, len(tok.encode(reply, add_special_tokens=False))))))
        out.append(turns_ids)
        if len(out) == count:
            break
    return out


COUNTERS = ("lookups", "hits", "hit_tokens", "slot_reuses", "aliased_blocks", "evicted_blocks", "evicted")


def replay(llm: LLM, convs, chatml: dict, concurrency: int) -> dict:
    engine = llm.engine
    before = engine.stats()["prefix_cache"]
    first = chatml["system"]
    state = {}  # request id -> (conversation, turn, prompt ids)
    ttft: dict[int, list[float]] = {}
    queue = list(range(len(convs)))
    active = 0
    prompt_tokens = output_tokens = 0

    def send(c: int, turn: int, history: list[int]) -> None:
        user, reply_len = convs[c][turn]
        ids = history + chatml["user"] + user + chatml["end_user"]
        rid = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=reply_len, ignore_eos=True),
                                 stream=False)
        state[rid] = (c, turn, ids)

    t0 = time.monotonic()
    while queue or active or engine.has_unfinished_requests():
        while queue and active < concurrency:
            send(queue.pop(0), 0, list(first))
            active += 1
        for out in engine.step():
            if not out.finished:
                continue
            c, turn, ids = state.pop(out.request_id)
            ttft.setdefault(turn, []).append(out.metrics.ttft)
            prompt_tokens += len(ids)
            output_tokens += len(out.token_ids)
            if turn + 1 < len(convs[c]):
                send(c, turn + 1, ids + out.token_ids + chatml["end_assistant"])
            else:
                active -= 1
    elapsed = time.monotonic() - t0
    pc = engine.stats()["prefix_cache"]
    if pc is not None and before is not None:
        pc = {k: v - before.get(k, 0) if k in COUNTERS else v for k, v in pc.items()}
    return {"elapsed_s": elapsed, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
            "mean_ttft_ms_by_turn": {t + 1: 1e3 * statistics.mean(v) for t, v in sorted(ttft.items())},
            "mean_ttft_ms_turn3_on": 1e3 * statistics.mean([x for t, v in ttft.items() if t >= 2 for x in v] or [0]),
            "prefix_cache": pc}


def chatml_pieces(tok) -> dict:
    """The token runs SmolLM2's ChatML template puts around messages."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return {"system": enc("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                          "Face<|im_end|>\n"),
            "user": enc("<|im_start|>user\n"), "end_user": enc("<|im_end|>\n<|im_start|>assistant\n"),
            "end_assistant": enc("<|im_end|>\n")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=4, help="conversations replayed (every turn) before timing")
    ap.add_argument("--max-user", type=int, default=256, help="cap on a user message's tokens")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-memory", type=float)
    ap.add_argument("--json")
    args = ap.parse_args()
    result = {"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for caching in (True, False):
        llm = LLM(args.model, load_format=args.load_format, max_model_len=args.max_model_len,
                  max_num_seqs=args.concurrency, kv_cache_memory=args.kv_cache_memory,
                  enable_prefix_caching=caching)
        tok = llm.tokenizer
        convs = pick(tok, args.warmup + args.conversations, args.turns, args.max_user, args.max_output)
        # Warm-up on other conversations, so Triton compiles and first-use costs land in neither
        # measured run; the prefix cache starts empty again after it.
        replay(llm, convs[:args.warmup], chatml_pieces(tok), args.concurrency)
        llm.engine.drop_cached_kv()  # the cache starts empty; replay() counts its hits from here
        r = replay(llm, convs[args.warmup:], chatml_pieces(tok), args.concurrency)
        stats = llm.engine.stats()
        r.update(tokens_per_page=stats["tokens_per_page"], engine_driver_calls=stats["engine_driver_calls"],
                 mapping_waits=stats["mapping_waits"])
        result["on" if caching else "off"] = r
        print(f"prefix caching {'on ' if caching else 'off'}: TTFT by turn (ms) "
              f"{ {k: round(v, 1) for k, v in r['mean_ttft_ms_by_turn'].items()} }, turns 3+: "
              f"{r['mean_ttft_ms_turn3_on']:.1f} ms, {r['total_tokens_per_s']:.0f} total tok/s, "
              f"{r['elapsed_s']:.1f} s", flush=True)
        close_llm(llm)
    result["ttft_speedup_turn3_on"] = result["off"]["mean_ttft_ms_turn3_on"] / result["on"]["mean_ttft_ms_turn3_on"]
    result["throughput_ratio"] = result["on"]["total_tokens_per_s"] / result["off"]["total_tokens_per_s"]
    print(f"mean TTFT from turn 3 on: {result['ttft_speedup_turn3_on']:.2f}x lower with prefix caching; "
          f"throughput {result['throughput_ratio']:.2f}x", flush=True)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
