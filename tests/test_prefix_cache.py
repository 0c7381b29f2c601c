"""Prefix caching by ownership: idle slots keep their KV, the index points into them, a follow-up
takes the slot that holds its history, other requests get the blocks aliased. Greedy outputs must
equal a run without caching whatever the traffic (shared prefixes around block boundaries,
multi-turn follow-ups, aborts, preemption under a tight pool, limit changes), and the books must
balance after every step (check_integrity compares them with the allocator)."""

import os
import random

import pytest

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams
from helpers import drain, finish_all

GREEDY = dict(temperature=0, ignore_eos=True)


def tiny(caching: bool, pages: int = 200, layout: str = "token-major", **kw) -> LLMEngine:
    """tiny-llama with random weights: 1 KiB of KV a token, so 4 tokens a 4 KiB host page
    token-major (per-layer: 16 tokens a page, 4 vTensors)."""
    per_block = 4 if layout == "per-layer" else 1
    return LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=128, max_num_seqs=4,
                                  max_num_batched_tokens=32, page_size=4096, kv_cache_memory=pages * per_block * 4096,
                                  kv_layout=layout, enable_prefix_caching=caching, check_integrity=True, **kw))


def run(eng, prompts, arrivals, max_tokens=6):
    return finish_all(eng, prompts, SamplingParams(max_tokens=max_tokens, **GREEDY), arrivals)


def test_a_follow_up_turn_takes_the_slot_that_holds_its_history():
    eng = tiny(True)
    rng = random.Random()
    first = [rng.randrange(10, 1000) for _ in range(23)]
    reply = run(eng, [first], [0], max_tokens=9)[0]
    (slot,) = [s for s in eng.kv.slots[1:] if s.tokens]
    calls = eng.stats()["engine_driver_calls"]
    follow = first + reply + [rng.randrange(10, 1000) for _ in range(5)]
    rid = eng.add_request(follow, SamplingParams(max_tokens=3, **GREEDY))
    eng.step()
    assert eng.requests[rid].slot is slot  # the same slot: nothing mapped, aliased or copied
    drain(eng)
    pc = eng.stats()["prefix_cache"]
    # turn 1's prompt and the reply's tokens whose KV was computed (all but the last) are reused
    assert pc["hit_tokens"] == len(first) + len(reply) - 1 and pc["slot_reuses"] == 1 and pc["aliased_blocks"] == 0
    assert eng.stats()["engine_driver_calls"] == calls == 0
    eng.close()


def test_a_shared_prefix_is_aliased_into_another_slot():
    """B arrives while A runs, sharing A's first blocks: B's slot maps A's physical pages."""
    eng = tiny(True)
    rng = random.Random()
    stem = [rng.randrange(10, 1000) for _ in range(13)]  # 3 full blocks and one token
    a = stem + [rng.randrange(10, 1000) for _ in range(6)]
    b = stem + [rng.randrange(10, 1000) for _ in range(2)]
    ra = eng.add_request(a, SamplingParams(max_tokens=20, **GREEDY))
    eng.step()  # A's prompt is computed and indexed
    rb = eng.add_request(b, SamplingParams(max_tokens=4, **GREEDY))
    eng.step()
    sa, sb = eng.requests[ra].slot, eng.requests[rb].slot
    assert sa is not sb and eng.requests[rb].num_computed_tokens >= 12
    eng.kv.books.drain()
    snap = eng.kv.snapshot()
    kv = {v["id"]: dict(zip(v["mapped_pages"], v["physical_pages"])) for v in snap["vtensors"]}[eng.kv.vtensors[0].id]
    bps = eng.kv.blocks_per_slot
    assert [kv[sb.index * bps + i] for i in range(3)] == [kv[sa.index * bps + i] for i in range(3)]
    assert kv[sb.index * bps + 3] != kv[sa.index * bps + 3]  # where B writes, a private page
    assert eng.stats()["prefix_cache"]["aliased_blocks"] == 3
    drain(eng)
    eng.close()


def test_reusing_an_alias_source_never_changes_the_other_holder():
    """A's idle slot is an alias source for B (running) when an unrelated C takes A's slot: the
    shared pages must be replaced in C's slot, not overwritten, or B reads C's KV."""
    rng = random.Random()
    stem = [rng.randrange(10, 1000) for _ in range(16)]
    a = stem + [rng.randrange(10, 1000)]
    b = stem + [rng.randrange(10, 1000) for _ in range(3)]
    c = [rng.randrange(10, 1000) for _ in range(30)]
    prompts, arrivals, lengths = [a, b, c], [0, 2, 16], [12, 30, 3]  # B aliases A's stem; C comes after A

    def serve(eng):
        ids, outs, step = {}, {}, 0
        while len(outs) < 3:
            for i, (p, at) in enumerate(zip(prompts, arrivals)):
                if at == step:
                    ids[eng.add_request(p, SamplingParams(max_tokens=lengths[i], **GREEDY))] = i
            for o in eng.step():
                if o.finished:
                    outs[ids[o.request_id]] = o.token_ids
            step += 1
        return [outs[i] for i in range(3)]

    reference = tiny(False)
    expected = serve(reference)
    reference.close()
    eng = LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=128, max_num_seqs=2,
                                 max_num_batched_tokens=32, page_size=4096, kv_cache_memory=60 * 4096,
                                 check_integrity=True))  # 4 slots: C must take an idle one
    assert serve(eng) == expected
    assert eng.stats()["prefix_cache"]["aliased_blocks"] == 4
    eng.close()


@pytest.mark.parametrize("layout", ["token-major", "page-major", "per-layer"])
def test_outputs_equal_with_and_without_caching_under_random_traffic(layout):
    """Shared stems cut at every offset, follow-up turns, aborts, a pool tight enough to reclaim
    and preempt, and a limit change mid-run: same outputs, books balanced after every step."""
    seed = int(os.environ.get("GLAKE_TEST_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    block = 16 if layout == "per-layer" else 4  # tokens a prefix block holds (tiny()); stems of 1 to 10 blocks
    stems = [[rng.randrange(10, 1000) for _ in range(rng.randrange(block, 10 * block))] for _ in range(4)]
    plan = []  # (arrival step, prompt | (index of an earlier request, new tail), max_tokens, abort step)
    for i in range(24):
        kept = [j for j, p in enumerate(plan) if p[3] is None]  # a follow-up continues a request never aborted
        if kept and rng.random() < 0.3:
            prompt = (rng.choice(kept), [rng.randrange(10, 1000) for _ in range(rng.randrange(1, 6))])
        else:
            stem = rng.choice(stems)
            prompt = stem[:rng.randrange(1, len(stem) + 1)] + [rng.randrange(10, 1000) for _ in range(rng.randrange(9))]
        at = 2 * i + rng.randrange(2)
        plan.append((at, prompt, rng.randrange(1, 9), at + rng.randrange(1, 6) if rng.random() < 0.15 else None))

    def serve(eng):
        # outs[i]: output tokens, or None for a request planned to be aborted: whether it finishes
        # before its abort step depends on scheduling, which the tight pool changes, so it is not compared.
        # A follow-up arrives once its earlier turn is done, however long that took.
        prompts, outs, ids, step = {}, {}, {}, 0
        while len(outs) < len(plan):
            for i, (at, prompt, n, abort_at) in enumerate(plan):
                if at <= step and i not in ids:
                    if isinstance(prompt, tuple):
                        base, tail = prompt
                        if base not in outs:
                            continue
                        prompt = prompts[base] + outs[base] + tail
                    prompts[i] = prompt[:100]
                    ids[i] = eng.add_request(prompts[i], SamplingParams(max_tokens=n, **GREEDY))
                if abort_at is not None and abort_at <= step and i in ids and i not in outs:
                    eng.abort_request(ids[i])
                    outs[i] = None
            for o in eng.step():
                i = next(j for j, r in ids.items() if r == o.request_id)
                if o.finished and i not in outs:
                    outs[i] = list(o.token_ids) if plan[i][3] is None else None
            if step == 20:  # the pool may not grow past its size now, and gives back free pages
                eng.set_kv_limit(eng.kv.min_pages * eng.kv.pool.page_size + 20 * eng.kv.pages_per_block * 4096)
            step += 1
            assert step < 2000, "the engine stopped making progress"
        return [outs[i] for i in range(len(plan))]

    reference = tiny(False, pages=400, layout=layout)
    expected = serve(reference)
    reference.close()
    eng = tiny(True, pages=45, layout=layout)
    got = serve(eng)
    stats = eng.stats()
    eng.close()
    assert got == expected, f"seed {seed}"
    assert stats["prefix_cache"]["hit_tokens"] > 0, f"seed {seed}"


def test_a_hash_collision_never_serves_another_prefixs_kv(monkeypatch):
    """Chain keys are hashes. Force every block whose tokens match to collide whatever its parent:
    lookups and indexing must check the parent and miss, not serve the other prompt's KV."""
    rng = random.Random()
    shared = [rng.randrange(10, 1000) for _ in range(4)]
    firsts = rng.sample(range(10, 1000), 3)
    prompts = [[f] + [rng.randrange(10, 1000) for _ in range(3)] + shared + [rng.randrange(10, 1000)] for f in firsts]
    reference = tiny(False)
    expected = run(reference, prompts, [0, 6, 12])
    reference.close()
    import glakeserve.kv.prefix as prefix
    monkeypatch.setattr(prefix, "block_key", lambda parent, tokens: hash(tokens) or 1)
    eng = tiny(True)
    assert run(eng, prompts, [0, 6, 12]) == expected
    assert eng.stats()["prefix_cache"]["hit_tokens"] == 0  # block 1 collides across prompts: all misses
    eng.close()


def test_unaligned_pages_disable_prefix_caching_with_a_reason(smollm2_dir):
    eng = LLMEngine(EngineConfig(max_model_len=128, max_num_seqs=2, page_size=256 << 10,
                                 kv_cache_memory=64 << 20))
    assert eng.stats()["prefix_cache"] is None and "do not hold whole" in eng.stats()["prefix_cache_disabled"]
    eng.close()


def test_chats_sharing_a_template_hit_on_smollm2(smollm2_dir):
    """The embedded model: 12 chats with one template, greedy, equal with and without caching."""
    def serve(caching):
        eng = LLMEngine(EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_memory=64 << 20,
                                     enable_prefix_caching=caching, check_integrity=True))
        system = ("You are a terse assistant. You answer questions about numbers in one short sentence, "
                  "always. You never explain, never apologise and never ask a question back. When a number is "
                  "asked for, you say it in words and then in digits, and you stop.")  # more than a 44-token page
        prompts = [eng.tokenizer.chat_ids([{"role": "system", "content": system},
                                           {"role": "user", "content": f"Say the number {i}."}]) for i in range(12)]
        outs = finish_all(eng, prompts, SamplingParams(temperature=0, max_tokens=6), [i // 2 for i in range(12)])
        hits = eng.stats()["prefix_cache"]
        eng.close()
        return outs, hits

    expected, _ = serve(False)
    got, hits = serve(True)
    assert got == expected
    assert hits["hit_tokens"] >= 10 * 44 and hits["slot_reuses"] > 0 and hits["aliased_blocks"] > 0
