"""The elastic pool: idle pages go back to the driver, the pool grows again under load up to its
limit, and the limit can be changed while requests run without any of them failing or losing a page."""

import pytest

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams
from helpers import finish_all

PAGE = 2 * 184320  # 8 SmolLM2 tokens (float32, token-major) a page


def make(pages, max_pages=None):
    return LLMEngine(EngineConfig(max_model_len=128, max_num_seqs=4, page_size=PAGE, kv_cache_memory=pages * PAGE,
                                  kv_cache_max_memory=(max_pages or pages) * PAGE, check_integrity=True))


def run(eng, prompts, max_tokens=24):
    return finish_all(eng, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


PROMPTS = ["Tell me about the moon.", "List three fruits:", "Why is the sky blue?", "Count from one:"]


def test_idle_release_then_grow_back_up_to_the_limit(smollm2_dir):
    eng = make(40, max_pages=80)
    first = run(eng, PROMPTS)
    total = eng.stats()["kv_pages"]["total"]
    released = eng.release_idle_memory()
    s = eng.stats()
    assert released > 0 and s["kv_pages"]["total"] == total - released and s["kv_pages"]["free"] == 0
    assert s["kv_pages"]["cached"] == 0 and s["pool"]["pages_released"] >= released
    again = run(eng, PROMPTS)  # the pool grows back on demand
    assert again == first
    assert eng.stats()["kv_pages"]["total"] <= 80
    eng.close()


def test_growth_stops_at_the_limit_and_preemption_takes_over(smollm2_dir):
    eng = make(20, max_pages=24)  # 4 requests of ~30 tokens want ~16 pages plus look-ahead
    reference = make(200)
    assert run(eng, PROMPTS * 2, max_tokens=60) == run(reference, PROMPTS * 2, max_tokens=60)
    assert eng.stats()["kv_pages"]["total"] <= 24
    eng.close()
    reference.close()


def test_lowering_the_limit_under_load_keeps_every_request(smollm2_dir):
    eng = make(60, max_pages=60)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in PROMPTS]
    for _ in range(5):
        eng.step()
    def held():
        return {s["owner"]: s["mapped_pages"] + s["queued_pages"] for s in eng.stats()["slots"] if s["owner"]}

    before = held()
    state = eng.set_kv_limit(30 * PAGE)  # below what is there now: only free pages may go
    assert state["max_pages"] == 30
    after = held()
    assert all(after[r] >= before[r] for r in ids)  # nothing a running request holds was taken
    done = set()
    while eng.has_unfinished_requests():
        done |= {o.request_id for o in eng.step() if o.finished}
    assert done == set(ids)
    eng.release_idle_memory()
    assert eng.stats()["kv_pages"]["total"] <= 30
    with pytest.raises(ValueError, match="cannot hold one request of max_model_len=128"):
        eng.set_kv_limit(PAGE)
    eng.close()
