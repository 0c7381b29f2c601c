"""Under a pool so small that requests must be preempted (and recomputed), greedy outputs equal an
unconstrained run, seeded sampling too, and the KV cache's books balance after every step."""

import pytest

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams
from helpers import finish_all

PROMPTS = [
    "Tell me a story about a dragon who",
    "List three uses of copper:",
    "The quick brown fox",
    "Explain photosynthesis to a child.",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time in a small village",
]


# page size and a pool too small for all six requests at once, per layout: token-major pages hold
# whole tokens (5 a page here), per-layer pages hold 21 tokens of one layer's K or V
GEOMETRY = {"token-major": (256 << 10, 24), "per-layer": (16 << 10, 600),
            "paged": (30 * 2 * 16 * 3 * 64 * 4, 12)}  # paged: blocks of 16 tokens (all layers' K and V)


def run(layout: str, pages: int, params: SamplingParams) -> tuple[list[list[int]], dict]:
    page_size = GEOMETRY[layout][0]
    engine = LLMEngine(EngineConfig(max_model_len=128, max_num_seqs=6, max_num_batched_tokens=64,
                                    kv_cache_memory=pages * page_size, kv_layout=layout,
                                    page_size=None if layout == "paged" else page_size,
                                    check_integrity=True))
    outputs = finish_all(engine, PROMPTS, params)
    stats = engine.stats()
    engine.close()
    return outputs, stats


@pytest.mark.parametrize("layout,temperature", [("token-major", 0.0), ("per-layer", 0.0), ("paged", 0.0),
                                                ("token-major", 0.8)])
def test_outputs_survive_preemption(layout, temperature):
    params = SamplingParams(temperature=temperature, seed=1234, max_tokens=32, ignore_eos=True)
    free, _ = run(layout, 10_000, params)
    tight, stats = run(layout, GEOMETRY[layout][1], params)
    assert stats["preemptions"] > 0, stats
    assert tight == free


@pytest.mark.parametrize("layout", ["token-major", "per-layer"])
def test_pages_mapped_ahead_do_not_keep_a_waiting_request_out(layout):
    """A running request's pages mapped lookahead_tokens ahead come after the prompt of the next
    admission: a pool with room for two prompts runs two requests at once, not one after another."""
    per_block = 4 if layout == "per-layer" else 1  # tiny-llama: 1 KiB a token, 4 KiB pages
    eng = LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", max_model_len=128, max_num_seqs=4,
                                 max_num_batched_tokens=24, page_size=4096, kv_cache_memory=34 * per_block * 4096,
                                 kv_layout=layout, check_integrity=True))
    assert eng.kv.lookahead_tokens >= 64  # alone, the first request's lookahead would take the pool
    for i in range(3):
        eng.add_request([10 + 7 * i + j for j in range(60)], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    most = 0
    while eng.has_unfinished_requests():
        eng.step()
        most = max(most, len(eng.scheduler.running))
    eng.close()
    assert most >= 2
