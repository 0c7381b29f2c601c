"""Tensor parallelism on two GPUs (NCCL). llama-3-8b dummy weights give TP=1's logits (every step's)
and greedy tokens at TP=2, with decode CUDA graphs captured on both ranks and without; closing the
engine gives every rank's GPU memory back; a rank killed mid-generation ends it with an error naming
the rank instead of leaving rank 0 waiting on its device forever, leaves no process behind, and the
same process starts a new engine afterwards, whose hung rank is then given up after the timeout.
Runs where at least two GPUs exist."""

from __future__ import annotations

import faulthandler
import gc
import os
import signal
import time

import pytest
import torch

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]

PROMPTS = [[128000, 791, 6864, 315, 9822, 374], list(range(1000, 1300)), list(range(5000, 5040))]
MAX_TOKENS = [8, 12, 16]  # decode batches of 3 (replayed padded to 4), then 2, then 1


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)  # a time-out of the run shows where
    faulthandler.dump_traceback_later(200, exit=True)  # a hang prints every thread's stack and ends the run
    yield
    faulthandler.cancel_dump_traceback_later()


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()  # the next engine needs this GPU's memory


def greedy_run(tp: int, enforce_eager: bool = False) -> tuple[list[torch.Tensor], list[list[int]], list[str]]:
    """Every step's sampled logits (float32 weights: sums in another order differ by rounding only),
    each prompt's greedy tokens, and each step's path ("graph" or "eager")."""
    engine = LLMEngine(EngineConfig(model="llama-3-8b", load_format="dummy", dtype="float32", max_model_len=1024,
                                    max_num_seqs=4, kv_cache_memory=2 << 30, tensor_parallel_size=tp,
                                    tensor_parallel_timeout=120, enforce_eager=enforce_eager))
    seen, paths = [], []
    logits = engine.runner.model.logits

    def spy(hidden):
        out = logits(hidden)
        seen.append(out.cpu())
        return out

    engine.runner.model.logits = spy
    try:
        ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
               for p, n in zip(PROMPTS, MAX_TOKENS)]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
            paths.append(engine.last_path)
    finally:
        engine.close()
        del engine, logits, spy
        free_gpu()
    return seen, [done[i] for i in ids], paths


@pytest.fixture(scope="module")
def tp1_run():
    return greedy_run(1)


def check_tp2_matches_tp1(tp1_run, graphs: bool) -> None:
    want, want_tokens, want_paths = tp1_run
    got, got_tokens, paths = greedy_run(2, enforce_eager=not graphs)
    print(f"TP=2 {'graphs' if graphs else 'eager'}: {paths.count('graph')} graph steps, {paths.count('eager')} eager; "
          f"TP=1: {want_paths.count('graph')} graph steps")
    assert "graph" in want_paths  # TP=1 replays its decode graphs
    assert ("graph" in paths) == graphs
    assert got_tokens == want_tokens
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4, msg=lambda m: f"step {step}: {m}")


def test_llama3_8b_tp2_with_decode_graphs_matches_tp1(tp1_run):
    check_tp2_matches_tp1(tp1_run, graphs=True)


def tp2_engine(timeout: float) -> LLMEngine:
    return LLMEngine(EngineConfig(model="llama-3-8b", load_format="dummy", max_model_len=1024, max_num_seqs=4,
                                  kv_cache_memory=2 << 30, tensor_parallel_size=2, tensor_parallel_timeout=timeout))


def test_a_rank_killed_mid_generation_ends_it_naming_the_rank_and_the_process_goes_on():
    """Under NCCL rank 0's kernels would wait for the dead rank forever: rank 0 polls its step's
    event while it watches the ranks, and aborts the communicator (graphs first)."""
    import torch.distributed as dist

    from glakeserve.distributed.workers import TensorParallelError

    free_gpu()
    engine = tp2_engine(timeout=60)
    procs = list(engine.tp.procs.values())
    try:
        assert engine.runner.graphs is not None
        for p in PROMPTS:
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=900, ignore_eos=True))
        for _ in range(20):
            engine.step()
        assert engine.last_path == "graph"
        os.kill(procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"tensor-parallel rank 1 died \(killed by SIGKILL\)"):
            while engine.has_unfinished_requests():
                engine.step()
        noticed = time.monotonic() - start
    finally:
        start_close = time.monotonic()
        engine.close()
        closed = time.monotonic() - start_close
    print(f"SIGKILL of rank 1 during decode graphs: error after {noticed:.3f} s, close took {closed:.3f} s")
    assert noticed < 10 and closed < 30
    assert not any(p.is_alive() for p in procs)
    assert not dist.is_initialized()
    del engine
    free_gpu()

    engine = tp2_engine(timeout=5)  # the same process, after an abort: a new group, new graphs
    procs = list(engine.tp.procs.values())
    try:
        engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=900, ignore_eos=True))
        for _ in range(10):
            outs = engine.step()
        assert engine.last_path == "graph" and outs and outs[0].token_ids
        os.kill(procs[0].pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank\(s\) 1 stopped answering.*tensor_parallel_timeout=5 s"):
            while engine.has_unfinished_requests():
                engine.step()
        noticed = time.monotonic() - start
    finally:
        engine.close()
    print(f"SIGSTOP of rank 1: error after {noticed:.3f} s (timeout 5 s)")
    assert 5 <= noticed < 30
    assert not any(p.is_alive() for p in procs)


def test_llama3_8b_tp2_eager_matches_tp1(tp1_run):
    check_tp2_matches_tp1(tp1_run, graphs=False)


def mem_free(device: int) -> int:
    return torch.cuda.mem_get_info(device)[0]


def test_close_gives_every_gpu_its_memory_back():
    free_gpu()
    free_before = [mem_free(i) for i in range(2)]
    engine = LLMEngine(EngineConfig(model="llama-3-8b", load_format="dummy", max_model_len=1024, max_num_seqs=8,
                                    kv_cache_memory=4 << 30, tensor_parallel_size=2))
    assert all(mem_free(i) < free_before[i] - (6 << 30) for i in range(2))  # ~8 GB of weights each
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.graphs is not None
    procs = list(engine.tp.procs.values())
    engine.close()
    assert not any(p.is_alive() for p in procs)
    del engine
    free_gpu()
    # rank 1's process is gone with its memory (the driver may take a moment after the exit); rank 0's
    # weights, graphs and NCCL buffers go with the engine (its caching allocator keeps at most what the
    # last steps used)
    deadline = time.monotonic() + 10
    while mem_free(1) < free_before[1] - (256 << 20) and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"free after close: GPU0 {(free_before[0] - mem_free(0)) / 2**20:.0f} MiB below before, "
          f"GPU1 {(free_before[1] - mem_free(1)) / 2**20:.0f} MiB")
    assert mem_free(1) > free_before[1] - (256 << 20)
    assert mem_free(0) > free_before[0] - (1 << 30)
