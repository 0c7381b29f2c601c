"""The scheduler's rules, driven without a model: chunked prefill under the token budget,
max_num_seqs, first come first served, preemption of the newest, abort, and a step in flight
(tokens read one step late) giving the same batches."""

import itertools

import torch

from glakeserve.kv import VTensorKVCache
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.request import Request, RequestMetrics
from glakeserve.sampling import SamplingParams
from glakeserve.scheduler import Scheduler
from glakeserve.vtensor import PagePool

ids = itertools.count()


def make(pages=256, max_num_seqs=4, budget=16, max_len=64):
    pool = PagePool(pages, page_size=4096, backend="host")
    kv = VTensorKVCache(pool, DUMMY_SHAPES["tiny-llama"], torch.float32, max_len, 2 * max_num_seqs,
                        prefix_caching=False, owns_pool=True)
    return Scheduler(kv, max_num_seqs, budget)


def req(prompt_len, max_tokens=8):
    return Request(request_id=str(next(ids)), prompt_token_ids=[5] * prompt_len, params=SamplingParams(),
                   seed=0, metrics=RequestMetrics(0.0), max_tokens=max_tokens)


def step(s: Scheduler):
    """What the engine does around the model: schedule, then hand back a token for every sampler."""
    batch = s.schedule()
    s.update(batch, [7] * len(batch.samplers))
    s.kv.check_integrity(s.tokens_held())
    return batch


def test_chunked_prefill_under_the_budget():
    s = make(budget=16)
    a, b = req(40), req(3)
    s.add(a)
    s.add(b)
    assert [step(s).num_new_tokens for _ in range(3)] == [[16], [16], [8, 3]]
    assert step(s).num_new_tokens == [1, 1]  # both decode now


def test_max_num_seqs_and_fcfs():
    s = make(max_num_seqs=2, budget=64)
    reqs = [req(4) for _ in range(4)]
    for r in reqs:
        s.add(r)
    batch = step(s)
    assert [r.request_id for r in batch.requests] == [reqs[0].request_id, reqs[1].request_id]
    assert list(s.waiting) == reqs[2:]


def test_newest_running_request_is_preempted_and_recomputed():
    s = make(pages=20, budget=64, max_len=64)  # 1 KiB a token, 4 tokens a page: 80 tokens in all
    a, b, c = req(30, max_tokens=30), req(30, max_tokens=30), req(10, max_tokens=30)
    for r in (a, b, c):
        s.add(r)
    preempted = []
    for _ in range(300):
        preempted += step(s).preempted
        if not s.has_unfinished():
            break
    assert preempted and preempted[0] is c  # the newest goes first
    assert c.num_preemptions >= 1
    assert not s.has_unfinished()
    assert all(len(r.output_token_ids) == 30 for r in (a, b, c))


def test_abort_running_and_waiting():
    s = make(max_num_seqs=1)
    a, b = req(5), req(5)
    s.add(a)
    s.add(b)
    step(s)
    assert s.abort(b.request_id) is b and b.finish_reason == "abort"
    slot = a.slot
    assert s.abort(a.request_id) is a and slot.owner is None and slot.index in s.kv.idle  # reclaimable at once
    assert s.kv.stats().request_pages == 0
    assert not s.has_unfinished()


def test_a_step_in_flight_gives_the_serial_batches():
    """Reading each step's tokens one step late (as the async engine does) schedules the same
    batches as reading them at once, plus at most one wasted row per finishing request."""
    def run(lag: int):
        s = make(pages=40, budget=24, max_len=64)
        reqs = [req(n, max_tokens=m) for n, m in ((30, 5), (3, 9), (12, 2), (20, 7))]
        for r in reqs:
            s.add(r)
        index = {r.request_id: i for i, r in enumerate(reqs)}
        in_flight, batches = [], []
        while s.has_unfinished() or in_flight:
            batch = s.schedule()
            batches.append([(index[r.request_id], n) for r, n in zip(batch.requests, batch.num_new_tokens)])
            in_flight.append(batch)
            while len(in_flight) > lag or (in_flight and not s.has_unfinished()):
                done = in_flight.pop(0)
                s.update(done, [7] * len(done.samplers))
            s.kv.check_integrity(s.tokens_held())
        return [r.output_token_ids for r in reqs], [b for b in batches if b]

    serial_out, serial = run(0)
    async_out, overlapped = run(1)
    assert async_out == serial_out and [len(o) for o in serial_out] == [5, 9, 2, 7]
    assert overlapped == serial  # max_tokens is known ahead: no wasted row here
