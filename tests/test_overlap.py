"""Overlapped scheduling (a step launched before the last one's tokens are read) against the serial
engine on the CPU, where the same code paths run: outputs, finish reasons and streamed deltas must be
identical for greedy and seeded sampling (logprobs too), stop strings, stop token ids, min_tokens, max_tokens,
penalties, aborts mid-flight and preemption under a tiny pool."""

import os
import random

import pytest

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams


def engine(async_scheduling: bool, pages: int = 300, **kw) -> LLMEngine:
    """tiny-llama with random weights (1 KiB of KV a token, 4 tokens a 4 KiB page)."""
    return LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=128, max_num_seqs=4,
                                  max_num_batched_tokens=24, page_size=4096, kv_cache_memory=pages * 4096,
                                  async_scheduling=async_scheduling, check_integrity=True, **kw))


def serve(eng: LLMEngine, plan: list) -> dict:
    """plan: (arrival step, prompt, params, abort step or None). Returns per request index its
    finished output's (tokens, finish reason, stop reason) and the streamed token deltas in order."""
    ids, result, deltas, step = {}, {}, {}, 0
    while len(result) < len(plan):
        for i, (at, prompt, params, abort_at) in enumerate(plan):
            if at == step:
                ids[eng.add_request(prompt, params)] = i
            if abort_at == step and i not in result:
                rid = next(r for r, j in ids.items() if j == i)
                out = eng.abort_request(rid)
                result[i] = ("aborted",) if out is not None else result.get(i)
        for out in eng.step():
            i = ids[out.request_id]
            deltas.setdefault(i, []).extend(out.delta_token_ids)
            if out.finished and i not in result:
                logprobs = [(lp.token_id, round(lp.logprob, 3), [t for t, _ in lp.top]) for lp in out.logprobs or []]
                result[i] = (out.token_ids, out.finish_reason, out.stop_reason, logprobs)
        step += 1
        assert step < 3000
    return {"result": result, "deltas": {i: d for i, d in deltas.items() if result[i] != ("aborted",)}}


def random_plan(rng: random.Random, n: int = 14) -> list:
    plan = []
    for i in range(n):
        prompt = [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 70))]
        kind = rng.randrange(5)
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 20), ignore_eos=True)
        elif kind == 1:
            params = SamplingParams(temperature=0.9, top_p=0.9, seed=rng.randrange(1 << 30),
                                    max_tokens=rng.randrange(1, 20), ignore_eos=True, logprobs=rng.choice([None, 0, 3]))
        elif kind == 2:  # stop token ids: whatever greedy picks often enough ends it early
            params = SamplingParams(temperature=1.0, seed=rng.randrange(1 << 30), max_tokens=20,
                                    stop_token_ids=[rng.randrange(3, 1000) for _ in range(60)],
                                    min_tokens=rng.randrange(0, 3))
        elif kind == 3:
            params = SamplingParams(temperature=0.7, seed=rng.randrange(1 << 30), max_tokens=16,
                                    repetition_penalty=1.3, frequency_penalty=0.5)
        else:
            params = SamplingParams(temperature=0, max_tokens=rng.randrange(2, 12), min_tokens=1)
        abort_at = 2 * i + rng.randrange(1, 6) if rng.random() < 0.15 else None
        plan.append((2 * i + rng.randrange(2), prompt, params, abort_at))
    return plan


@pytest.mark.parametrize("pages", [300, 34])  # 34: one request of max_model_len and the padding slot
def test_overlapped_outputs_equal_the_serial_engine(pages):
    seed = int(os.environ.get("GLAKE_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    plan = random_plan(rng)
    # Tight: three 60-token prompts first in line need 45 pages of 33, mapped 4 tokens ahead (64
    # tokens ahead, the first request's pages would leave none to admit a second: nothing preempted).
    tight = dict(lookahead_tokens=4) if pages == 34 else {}
    if tight:
        plan = [(0, [rng.randrange(3, 1000) for _ in range(60)],
                 SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), None) for _ in range(3)] + plan
    got = {}
    for mode in (False, True):
        eng = engine(mode, pages=pages, **tight)
        got[mode] = serve(eng, plan)
        stats = eng.stats()
        eng.close()
        if pages == 34:
            assert stats["preemptions"] > 0, f"seed {seed}: the tight pool preempted nothing"
    same_outputs(plan, got[False], got[True], seed)


def same_outputs(plan: list, serial: dict, overlapped: dict, seed: int) -> None:
    """Equal results and streamed deltas, but for one race: the overlapped engine reads a step's
    tokens one step late, so an abort may still find (and end) a request whose last token the serial
    engine has already delivered. The reverse cannot happen."""
    raced = set()
    for i, (_, _, _, abort_at) in enumerate(plan):
        a, b = serial["result"][i], overlapped["result"][i]
        if abort_at is not None and a != b and b == ("aborted",) and a != ("aborted",):
            raced.add(i)
            continue
        assert a == b, f"seed {seed}: request {i}: serial {a}, overlapped {b}"
    assert {i: d for i, d in serial["deltas"].items() if i not in raced} == overlapped["deltas"], f"seed {seed}"


def test_stop_strings_end_at_the_same_token_with_a_step_in_flight(smollm2_dir):
    """Stop strings are only known once text is detokenized, a step late with overlap: the text and
    the tokens returned must still stop exactly where the serial engine stops."""
    texts = {}
    for mode in (False, True):
        eng = LLMEngine(EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_memory=64 << 20,
                                     async_scheduling=mode, check_integrity=True))
        full = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
                for p in ("The three primary colours are", "List the planets:")]
        done = {}
        while eng.has_unfinished_requests():
            done.update({o.request_id: o for o in eng.step() if o.finished})
        words = [done[r].text.split() for r in full]
        stops = [w[len(w) // 2] for w in words]
        cut = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[s]))
               for p, s in zip(("The three primary colours are", "List the planets:"), stops)]
        streamed = {r: "" for r in cut}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.request_id in streamed:
                    streamed[o.request_id] += o.delta_text
                    if o.finished:
                        done[o.request_id] = o
        texts[mode] = [(done[r].text, done[r].token_ids, done[r].finish_reason, streamed[r]) for r in cut]
        for text, _, reason, stream in texts[mode]:
            assert reason == "stop" and stream == text
        eng.close()
    assert texts[True] == texts[False]
