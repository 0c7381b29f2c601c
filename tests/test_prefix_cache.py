"""Prefix caching by page aliasing: the same greedy outputs with it as without, for prompts sharing
prefixes of every length around page boundaries, interleaved with unrelated requests and under
memory pressure; copy-on-write that never disturbs another holder; the books after every step."""

import random

import pytest
import torch

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams
from helpers import finish_all

# host pages that hold whole tokens: 8 SmolLM2 tokens (float32) token-major, 16 per-layer
PAGES = {"token-major": 2 * 184320, "per-layer": 12288}
BASE = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from wine-making. Within decades, presses "
        "spread across Europe and books became cheaper. ")


def engine(layout, caching, pages=None, **kw):
    pages = pages or (400 if layout == "token-major" else 4000)  # per-layer: 60 vTensors, a page each
    return LLMEngine(EngineConfig(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, kv_layout=layout,
                                  page_size=PAGES[layout], kv_cache_memory=pages * PAGES[layout],
                                  enable_prefix_caching=caching, check_integrity=True, **kw))


def run(eng, prompts, arrivals, max_tokens=10):
    """prompts arrive at the given steps; returns each one's output tokens."""
    return finish_all(eng, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), arrivals)


@pytest.mark.parametrize("layout", ["token-major", "per-layer"])
def test_outputs_equal_with_and_without_prefix_caching(layout, smollm2_dir):
    probe = engine(layout, True)
    tok, T = probe.tokenizer, probe.kv.tokens_per_page()
    base = tok.encode(BASE * 2)
    probe.close()
    rng = random.Random()
    prompts, arrivals = [], []
    for i, cut in enumerate([T - 1, T, T + 1, 2 * T - 1, 2 * T, 2 * T + 1, 3 * T + rng.randrange(T)]):
        prompts.append(base[:cut] + tok.encode(f" Question {i}: why?"))  # a shared prefix of `cut` tokens
        arrivals.append(2 * i)
        prompts.append(tok.encode(f"Unrelated request number {i} about {rng.choice(['cats', 'rain', 'jazz'])}."))
        arrivals.append(2 * i + 1)
    prompts.append(list(base[:2 * T]))  # a prompt the cache holds whole: its last token is recomputed
    arrivals.append(30)
    with_cache = engine(layout, True, pages=60 if layout == "token-major" else 1500)  # tight: evictions happen
    got = run(with_cache, prompts, arrivals)
    stats = with_cache.stats()["prefix_cache"]
    with_cache.close()
    without = engine(layout, False, pages=2000 if layout == "token-major" else 20000)
    expected = run(without, prompts, arrivals)
    assert without.stats()["prefix_cache"] is None
    without.close()
    assert got == expected
    assert stats["hit_tokens"] >= 5 * T, stats  # later requests reused their predecessors' pages


def test_copy_on_write_never_changes_another_holders_cache(smollm2_dir):
    eng = engine("token-major", True)
    T = eng.kv.tokens_per_page()
    tok = eng.tokenizer
    a = tok.encode(BASE)[: 3 * T + 5]  # ends 5 tokens into a page
    run(eng, [a], [0], max_tokens=1)  # finished: its full pages and its partial last page are cached
    cache = eng.kv.prefix
    partial = [e for e in cache.entries.values() if e.partial_len]
    assert partial, "the finished request's partial last page was not cached"
    ps = eng.pool.page_size
    cache_vt = cache.vtensors[0]
    before = {e.page: cache_vt.view(torch.uint8, (ps,), offset=e.page * ps).clone() for e in cache.entries.values()}
    b = a + tok.encode(" and then something else entirely")  # shares all of a's tokens
    rid = eng.add_request(b, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    eng.step()  # admitted: 3 pages aliased, the 4th copied, the rest computed into private pages
    req = eng.requests[rid]
    slot = req.slot
    assert {0, 1, 2} <= slot.shared
    hit = eng.stats()["prefix_cache"]["hit_tokens"]
    assert hit >= 3 * T + 5
    kv_vt = eng.kv.vtensors[0]
    base_page = slot.index * eng.kv.pages_per_slot

    def physical(vt, page):
        st = vt.stats()
        return dict(zip(st.mapped_pages, st.physical_pages)).get(page)

    src = partial[0]
    # the page where the shared prefix ends is b's own copy: another physical page, other bytes now...
    assert physical(kv_vt, base_page + 3) != physical(cache_vt, src.page)
    copied = kv_vt.view(torch.uint8, (ps,), offset=(base_page + 3) * ps)
    assert not torch.equal(copied, before[src.page])
    # ...while the first three are the cache's own physical pages, aliased at the same offsets
    full = {physical(cache_vt, e.page) for e in cache.entries.values() if not e.partial_len}
    assert {physical(kv_vt, base_page + p) for p in range(3)} <= full
    for page, data in before.items():  # and no page that was cached before changed a byte
        assert torch.equal(cache_vt.view(torch.uint8, (ps,), offset=page * ps), data), page
    while eng.has_unfinished_requests():
        eng.step()
    eng.close()


def test_multi_turn_reuses_the_conversation(smollm2_dir):
    eng = engine("token-major", True)
    tok = eng.tokenizer
    conv = [{"role": "user", "content": "Name three rivers in Europe."}]
    first = eng.tokenizer.chat_ids(conv)
    out = run(eng, [first], [0], max_tokens=24)[0]
    conv += [{"role": "assistant", "content": tok.decode(out)}, {"role": "user", "content": "Which is longest?"}]
    hits_before = eng.stats()["prefix_cache"]["hit_tokens"]
    run(eng, [eng.tokenizer.chat_ids(conv)], [0], max_tokens=4)
    reused = eng.stats()["prefix_cache"]["hit_tokens"] - hits_before
    assert reused >= len(first) - 1, (reused, len(first))  # turn 2 prefilled only what turn 1 had not
    eng.close()


def test_lru_eviction_frees_pages_only_when_nobody_maps_them(smollm2_dir):
    eng = engine("token-major", True, pages=40)
    tok = eng.tokenizer
    texts = [tok.encode(f"Story {i}: " + BASE) for i in range(6)]  # 6 x ~7 pages: more than the pool
    run(eng, texts, list(range(0, 12, 2)), max_tokens=2)
    stats = eng.stats()["prefix_cache"]
    assert stats["evicted"] > 0 and stats["entries"] > 0
    eng.kv.check_integrity(eng.scheduler.tokens_held())
    eng.kv.prefix.clear()
    eng.release_idle_memory()
    s = eng.pool.stats()
    assert s.used_pages == len(eng.kv.vtensors)  # only the anchor page is left
    eng.close()


def test_unaligned_pages_disable_prefix_caching_with_a_reason(smollm2_dir):
    eng = LLMEngine(EngineConfig(max_model_len=128, max_num_seqs=2, page_size=256 << 10,
                                 kv_cache_memory=64 << 20))
    assert eng.kv.prefix is None and "do not hold whole" in eng.kv.prefix_disabled_reason
    eng.close()


def test_many_requests_sharing_a_prefix_under_pressure(smollm2_dir):
    """32 chats with one template in a pool that barely holds them: admission must never evict
    the entry it is copying from (it did once, and read an unmapped page)."""
    eng = LLMEngine(EngineConfig(max_model_len=512, max_num_seqs=32, kv_cache_memory=128 << 20,
                                 check_integrity=True))
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=12) for i in range(32)]
    for i, p in enumerate(params):
        eng.add_request(eng.tokenizer.chat_ids([{"role": "user", "content": f"Say the number {i}."}]), p)
    finished = 0
    while eng.has_unfinished_requests():
        finished += sum(o.finished for o in eng.step())
    assert finished == 32
    assert eng.stats()["prefix_cache"]["hit_tokens"] > 0
    eng.close()


def tiny(caching: bool, pages: int = 200) -> LLMEngine:
    """tiny-llama with random weights: 1 KiB of KV a token, 4 tokens a 4 KiB host page."""
    return LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=128, max_num_seqs=4,
                                  max_num_batched_tokens=32, page_size=4096, kv_cache_memory=pages * 4096,
                                  enable_prefix_caching=caching, check_integrity=True))


def test_a_hash_collision_never_serves_another_prefixs_kv(monkeypatch):
    """Chain keys are hashes. Force every page whose tokens match to collide whatever its parent:
    the lookup must check the parent and miss, not serve the other prompt's KV."""
    rng = random.Random()
    shared = [rng.randrange(10, 1000) for _ in range(4)]
    firsts = rng.sample(range(10, 1000), 3)  # distinct, so no prompt shares even a partial first page
    prompts = [[f] + [rng.randrange(10, 1000) for _ in range(3)] + shared + [rng.randrange(10, 1000)] for f in firsts]
    reference = tiny(False)
    expected = run(reference, prompts, [0, 6, 12], max_tokens=6)
    reference.close()
    import glakeserve.prefix_cache as pc
    monkeypatch.setattr(pc, "block_key", lambda parent, tokens: hash(tokens) or 1)
    eng = tiny(True)
    assert run(eng, prompts, [0, 6, 12], max_tokens=6) == expected
    assert eng.stats()["prefix_cache"]["hit_tokens"] == 0  # page 1 collides across prompts: all misses
    eng.close()


class SlowWorker:
    """Stands in for a worker that has not started the queued jobs yet: a job runs when a synchronous
    call comes (the allocator's claim() makes a synchronous map wait for queued jobs the same way)."""

    def __init__(self, pool):
        self.pool, self.queued = pool, []
        self.map_now = pool.map_batch
        for name in ("map_batch", "unmap_batch", "alias_batch"):
            setattr(pool, name, self.after_queued(getattr(pool, name)))
        pool.map_async = self.map_async

    def run_queued(self):
        while self.queued:
            self.queued.pop(0).wait()

    def after_queued(self, call):
        return lambda *a, **k: (self.run_queued(), call(*a, **k))[1]

    def map_async(self, items):
        slow = self

        class Job:
            finished = False

            def done(self):
                return self.finished

            def wait(self):
                if not self.finished:
                    self.finished = True
                    slow.map_now(items)

        self.queued.append(Job())
        return self.queued[-1]


def test_copy_on_write_admission_counts_pages_a_queued_job_will_take():
    """A running request's map-ahead job, queued but not started, will take every free page. A new
    request whose prompt matches part of a cached page then finds no private page for the copy: it
    must recompute those tokens, not fail the step (which in the server fails every stream)."""
    rng = random.Random()
    cached = [rng.randrange(10, 1000) for _ in range(6)]  # a full page and a partial one at finish
    long_prompt = [rng.randrange(10, 1000) for _ in range(20)]
    newcomer = cached[:3] + [rng.randrange(10, 1000)]  # 3 tokens of the cached first page
    params = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731

    def serve(eng, slow: SlowWorker | None):
        outs = {}
        eng.add_request(cached, params(1))
        while eng.has_unfinished_requests():
            eng.step()
        long_id = eng.add_request(long_prompt, params(40))
        for out in eng.step():
            outs[out.request_id] = out.token_ids
        if slow:
            slow.run_queued()
            running = eng.scheduler.running[0]
            # the next map-ahead wants exactly every free page
            eng.kv.lookahead_tokens = (running.slot.target + eng.pool.free_pages()) * 4 - running.num_tokens - 1
        for out in eng.step():
            outs[out.request_id] = out.token_ids
        if slow:
            assert slow.queued and eng.pool.free_pages() > 0  # the job is queued, its pages still look free
        new_id = eng.add_request(newcomer, params(4))
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    outs[out.request_id] = out.token_ids
        return outs[long_id], outs[new_id]

    reference = tiny(False, pages=34)
    expected = serve(reference, None)
    reference.close()
    eng = tiny(True, pages=34)
    slow = SlowWorker(eng.pool)
    assert serve(eng, slow) == expected
    eng.close()
