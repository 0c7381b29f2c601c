"""Penalties from token counts on the device: the penalised logits against a per-row reference, and
in the engine (serial and overlapped, with preemption under a tiny pool and rows reused by later
requests) the device counts equal the requests' output tokens after every step."""

import os
import random

import torch

from glakeserve.penalties import PenaltyRows
from glakeserve.sampling import SamplingParams
from tests.test_overlap import engine


def reference_row(row: torch.Tensor, p: SamplingParams, out: list[int], prompt: list[int]) -> torch.Tensor:
    ref = row.clone()
    for t in set(out) | set(prompt):  # repetition: prompt and output tokens
        ref[t] = ref[t] / p.repetition_penalty if ref[t] > 0 else ref[t] * p.repetition_penalty
    for t in set(out):  # presence and frequency: output tokens only
        ref[t] -= p.presence_penalty + p.frequency_penalty * out.count(t)
    return ref


def test_penalised_logits_equal_a_per_row_reference():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for _ in range(20):
        n, vocab = rng.randrange(1, 9), rng.randrange(5, 60)
        params = [SamplingParams(repetition_penalty=rng.choice([1.0, rng.uniform(0.5, 2.0)]),
                                 presence_penalty=rng.choice([0.0, rng.uniform(-2, 2)]),
                                 frequency_penalty=rng.choice([0.0, rng.uniform(-2, 2)])) for _ in range(n)]
        outs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))] for _ in range(n)]
        prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))] for _ in range(n)]
        rows = [i for i, p in enumerate(params) if p.uses_penalties]
        logits = torch.randn(n, vocab) * 3
        got = logits.clone()
        chunk = rng.choice([vocab, 2 * vocab + 1, 4 << 20])  # rows one, two or all at a time
        PenaltyRows.from_lists(rows, [outs[i] for i in rows], [prompts[i] for i in rows], vocab).apply(
            got, params, lambda values, dtype: torch.tensor(values, dtype=dtype), chunk_elements=chunk)
        for i in range(n):
            want = reference_row(logits[i], params[i], outs[i], prompts[i]) if i in rows else logits[i]
            torch.testing.assert_close(got[i], want, msg=f"seed {seed}, row {i}, chunk {chunk}")


def check_counts(eng, live) -> None:
    """Every live request with penalties: its device row counts its output tokens (plus the one in
    flight, not read yet), and marks exactly its prompt's tokens."""
    pc = eng.runner.penalties
    if pc is None:
        return
    rows = [row for _, row in pc.owner.values()]
    assert len(set(rows)) == len(rows) and len(rows) + len(pc.free) == pc.counts.shape[0]
    for req in live:
        if id(req) not in pc.owner:
            continue
        row = pc.owner[id(req)][1]
        want = torch.bincount(torch.tensor(req.output_token_ids, dtype=torch.int64), minlength=pc.vocab)
        extra = pc.counts[row].long() - want
        assert int(extra.min()) == 0 and int(extra.sum()) == req.num_pending, req.request_id
        prompt = torch.zeros(pc.vocab, dtype=torch.bool)
        prompt[req.prompt_token_ids] = True
        assert torch.equal(pc.in_prompt[row], prompt)


def test_device_counts_follow_the_outputs_after_every_step():
    seed = int(os.environ.get("GLAKE_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    for async_scheduling in (False, True):
        eng = engine(async_scheduling, pages=40, lookahead_tokens=4)
        arrivals = {}
        for i in range(14):  # more requests over time than rows at once: rows are reused
            params = SamplingParams(temperature=rng.choice([0, 0.8]), seed=rng.randrange(1 << 30), max_tokens=20,
                                    repetition_penalty=rng.choice([1.0, 1.4]), frequency_penalty=0.7,
                                    presence_penalty=rng.choice([0.0, 0.5]), ignore_eos=True)
            prompt = [rng.randrange(3, 60) for _ in range(rng.randrange(1, 50))]
            arrivals.setdefault(rng.randrange(20), []).append((prompt, params))
        step, done = 0, 0
        while done < 14:
            for prompt, params in arrivals.get(step, []):
                eng.add_request(prompt, params)
            done += sum(out.finished for out in eng.step())
            check_counts(eng, [r for r in eng.requests.values() if not r.finished])
            step += 1
            assert step < 2000, f"seed {seed}"
        assert eng.runner.penalties.counts.shape[0] < 14, f"seed {seed}: rows of finished requests not reused"
        assert eng.stats()["preemptions"] > 0, f"seed {seed}: the tight pool preempted nothing"
        eng.close()
