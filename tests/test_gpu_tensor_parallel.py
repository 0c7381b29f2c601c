"""Tensor parallelism on two GPUs (NCCL): llama-3-8b dummy weights give TP=1's logits at TP=2, and
closing the engine gives every rank's GPU memory back. Runs where at least two GPUs exist."""

from __future__ import annotations

import gc

import pytest
import torch

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]

PROMPTS = [[128000, 791, 6864, 315, 9822, 374], list(range(1000, 1300))]


def first_logits(tp: int) -> tuple[torch.Tensor, list[list[int]]]:
    """The logits of each prompt's first sampled token (float32 weights: sums in another order
    differ by rounding only), and 8 greedy tokens each."""
    engine = LLMEngine(EngineConfig(model="llama-3-8b", load_format="dummy", dtype="float32", max_model_len=1024,
                                    kv_cache_memory=2 << 30, tensor_parallel_size=tp, tensor_parallel_timeout=120))
    seen = []
    logits = engine.runner.model.logits

    def spy(hidden):
        out = logits(hidden)
        seen.append(out.cpu())
        return out

    engine.runner.model.logits = spy
    try:
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for p in PROMPTS]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
    finally:
        engine.close()
        del engine, logits, spy
        gc.collect()
        torch.cuda.empty_cache()  # the next engine needs this GPU's memory
    return seen[0], [done[i] for i in ids]


def test_llama3_8b_tp2_matches_tp1():
    want, want_tokens = first_logits(1)
    got, got_tokens = first_logits(2)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert got_tokens == want_tokens


def test_close_gives_every_gpu_its_memory_back():
    free_before = [torch.cuda.mem_get_info(i)[0] for i in range(2)]
    engine = LLMEngine(EngineConfig(model="llama-3-8b", load_format="dummy", max_model_len=1024,
                                    kv_cache_memory=4 << 30, tensor_parallel_size=2))
    assert all(torch.cuda.mem_get_info(i)[0] < free_before[i] - (6 << 30) for i in range(2))  # ~8 GB weights each
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    procs = list(engine.tp.procs.values())
    engine.close()
    assert not any(p.is_alive() for p in procs)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    # rank 1's process is gone with its memory; rank 0's weights go with the engine (its caching allocator keeps
    # at most what the last steps used)
    assert torch.cuda.mem_get_info(1)[0] > free_before[1] - (256 << 20)
    assert torch.cuda.mem_get_info(0)[0] > free_before[0] - (1 << 30)
