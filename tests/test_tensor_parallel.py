"""Tensor parallelism on the CPU (gloo): greedy outputs equal one process's token for token, with
chunked prefill, preemption, aborts and prefix caching, the books of every rank's pool checked
after every step, and with decode "graphs" replayed on every rank (on the CPU a replay reruns the
forward: the protocol of GPU graphs without a GPU); sizes that do not divide the model are refused;
a rank that fails, dies or hangs stops the engine with an error naming it, also while rank 0 waits
for its device as it does under NCCL, and no process outlives the engine.

Bounded in time: collectives time out (tensor_parallel_timeout), and a watchdog ends the whole run
with a traceback if a test still hangs."""

from __future__ import annotations

import faulthandler
import os
import signal
import time

import pytest
import torch

from rich.console import Console

from glakeserve.cli.memory_view import render_snapshot
from glakeserve.distributed.shard import TPShard, check_tensor_parallel_size
from glakeserve.distributed.workers import TensorParallelError
from glakeserve import model_runner
from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.model.config import DUMMY_SHAPES
from glakeserve.model.loader import dummy_weights
from glakeserve.sampling import SamplingParams
from glakeserve.server.metrics import prometheus
from helpers import save_tiny_hf_llama

TIMEOUT = 30.0  # seconds a collective may wait: far above any step here


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(240, exit=True)  # a hung rank fails the run, it does not hang CI
    yield
    faulthandler.cancel_dump_traceback_later()


# ----- the split ----------------------------------------------------------------------------
def test_sizes_that_do_not_divide_the_model_are_refused(smollm2_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 does not divide SmolLM2-135M-Instruct's 9 attention "
                                         r"heads and 3 KV heads .*sizes that work for it: 1, 3"):
        LLMEngine(EngineConfig(tensor_parallel_size=2))
    cfg = DUMMY_SHAPES["llama-3-70b"]
    check_tensor_parallel_size(cfg, 4)
    check_tensor_parallel_size(cfg, 16)  # 8 KV heads, each replicated on two ranks
    with pytest.raises(ValueError, match="must be a positive integer"):
        check_tensor_parallel_size(cfg, 0)
    with pytest.raises(ValueError, match="5 does not divide .* 64 attention heads"):
        check_tensor_parallel_size(cfg, 5)


def test_kv_heads_are_split_or_replicated():
    cfg = DUMMY_SHAPES["llama-3-70b"]  # 64 heads, 8 KV heads
    assert [(s.head_start, s.kv_head_start, s.num_kv_heads) for s in (TPShard.plan(cfg, 4, r) for r in range(4))] == \
        [(0, 0, 2), (16, 2, 2), (32, 4, 2), (48, 6, 2)]
    # 16 ranks: 4 query heads each, all reading one KV head that two ranks hold
    shards = [TPShard.plan(cfg, 16, r) for r in range(16)]
    assert [s.kv_head_start for s in shards] == [r // 2 for r in range(16)]
    for s in shards:  # every query head of the rank reads the KV head the rank holds (group of 8)
        assert {h // 8 for h in range(s.head_start, s.head_start + s.num_heads)} == {s.kv_head_start}
    assert TPShard.plan(cfg, 4, 3).vocab_start == 3 * 32064


class FakeGroup:
    """A rank's shard without processes: only what loading reads."""

    def __init__(self, cfg, size, rank):
        self.shard = TPShard.plan(cfg, size, rank)


def test_dummy_shards_are_slices_of_the_whole_model():
    cfg = DUMMY_SHAPES["tiny-llama"]  # 4 heads, 2 KV heads
    whole = dummy_weights(cfg, torch.float32, torch.device("cpu"), 64, seed=3)
    shards = [dummy_weights(cfg, torch.float32, torch.device("cpu"), 64, seed=3, tp=FakeGroup(cfg, 2, r))
              for r in range(2)]
    H, KVH, D, I = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    w, parts = whole.layers[1], [s.layers[1] for s in shards]
    q, k, v = w.qkv.weight.split([H * D, KVH * D, KVH * D])
    local = [p.qkv.weight.split([H * D // 2, KVH * D // 2, KVH * D // 2]) for p in parts]
    for i, full in enumerate((q, k, v)):
        assert torch.equal(torch.cat([lp[i] for lp in local]), full)
    assert torch.equal(torch.cat([p.o.weight for p in parts], dim=1), w.o.weight)
    assert torch.equal(torch.cat([p.down.weight for p in parts], dim=1), w.down.weight)
    gate, up = w.gate_up.weight.split(I)
    assert torch.equal(torch.cat([p.gate_up.weight[:I // 2] for p in parts]), gate)
    assert torch.equal(torch.cat([p.gate_up.weight[I // 2:] for p in parts]), up)
    assert torch.equal(torch.cat([s.embed for s in shards]), whole.embed)


# ----- the engine ---------------------------------------------------------------------------
def tp_engine(**kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(**{"check_integrity": True, "tensor_parallel_timeout": TIMEOUT, **kwargs}))


def alive(engine: LLMEngine) -> list:
    return [p for p in engine.tp.procs.values() if p.is_alive()]


def test_smollm2_tp3_matches_one_process(smol_llm):
    """9 heads and 3 KV heads over 3 ranks: one KV head each."""
    tok = smol_llm.tokenizer
    convos = ["What is the capital of France?", "Name three primary colors.", "What is the capital of Italy?"]
    prompts = [tok.chat_ids([{"role": "user", "content": c}]) for c in convos]
    params = SamplingParams(temperature=0, max_tokens=12)
    want = [o.token_ids for o in smol_llm.generate(prompts, params)]
    page = 16 * 30 * 2 * 64 * 4  # 16 tokens of one KV head's K and V in 30 layers: prompts fill whole pages
    engine = tp_engine(max_model_len=512, max_num_seqs=8, kv_cache_memory=96 << 20, page_size=page,
                       tensor_parallel_size=3)
    try:
        got = finish(engine, prompts, params)
        again = finish(engine, prompts[:1], params)  # its prompt now comes from the prefix cache
        stats = engine.stats()
        assert stats["prefix_cache"]["hits"] > 0
        ranks = stats["rank_pools"]  # every rank's own allocator: the same pages mapped on each
        assert [r["rank"] for r in ranks] == [0, 1, 2]
        assert len({(r["total_pages"], r["used_pages"], r["shared_pages"]) for r in ranks}) == 1
        assert ranks[0]["used_pages"] == stats["pool"]["used_pages"] > 1
        metrics = prometheus(stats, "m")
        assert f'glake_kv_rank_pages_mapped{{model="m",rank="2"}} {ranks[2]["used_pages"]}' in metrics
        assert f'glake_kv_rank_pages_mapped{{model="m",rank="all"}} {3 * ranks[2]["used_pages"]}' in metrics
        console = Console(width=200, record=True)
        console.print(render_snapshot(engine.memory_snapshot()))
        assert "KV pools per rank" in console.export_text()
        procs = list(engine.tp.procs.values())
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
    finally:
        engine.close()
    assert got == want
    assert again == want[:1]
    assert not any(p.is_alive() for p in procs)


def finish(engine: LLMEngine, prompts: list, params: SamplingParams, abort: dict[int, int] | None = None) -> list:
    """Runs prompts to completion (abort: prompt index -> step at which to abort it); outputs in order."""
    ids = {engine.add_request(p, params): i for i, p in enumerate(prompts)}
    by_index = {i: rid for rid, i in ids.items()}
    done, step = {}, 0
    while engine.has_unfinished_requests():
        for i, at in (abort or {}).items():
            if at == step and i not in done:
                out = engine.abort_request(by_index[i])
                if out is not None:
                    done[i] = ("aborted", out.token_ids)
        for out in engine.step():
            if out.finished and ids[out.request_id] not in done:
                done[ids[out.request_id]] = out.token_ids
        step += 1
    return [done[i] for i in range(len(prompts))]


TOKENS_PER_PAGE = 16


def random_engine(path, kv_heads: int, tp: int) -> LLMEngine:
    """Pages of 16 tokens on every rank (a page's bytes follow the rank's KV heads), and a pool so
    small that the workload below is preempted."""
    local_kv_heads = max(1, kv_heads // tp)
    page = TOKENS_PER_PAGE * 2 * 2 * local_kv_heads * 16 * 4  # tokens x layers x K,V x heads x dim x float32
    return tp_engine(model=str(path), max_model_len=96, max_num_seqs=4, max_num_batched_tokens=24,
                     kv_cache_memory=9 * page, page_size=page, tensor_parallel_size=tp)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa-split", "gqa-replicated"])
def test_random_llama_tp2_matches_one_process(tmp_path, kv_heads):
    """Chunked prefill (24-token budget), preemption (9 pages of 16 tokens for 5 requests that
    grow to ~60 tokens), an abort mid-decode, and prefix caching (shared 32-token starts)."""
    path = save_tiny_hf_llama(tmp_path / "m", heads=4, kv_heads=kv_heads, hidden=64, layers=2, vocab=257)
    g = torch.Generator().manual_seed(kv_heads)
    shared = torch.randint(3, 257, (32,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 257, (n,), generator=g).tolist() for n in (5, 9, 2)]
    prompts += [torch.randint(3, 257, (n,), generator=g).tolist() for n in (40, 7)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = []
    for tp in (1, 2):
        engine = random_engine(path, kv_heads, tp)
        try:
            outputs = finish(engine, prompts, params, abort={1: 12})
            stats = engine.stats()
        finally:
            engine.close()
        runs.append((outputs, stats))
        if tp == 2:
            assert not any(p.is_alive() for p in engine.tp.procs.values())
    (want, one), (got, two) = runs
    assert one["preemptions"] > 0 and one["prefix_cache"]["hits"] > 0, one
    assert got == want
    assert isinstance(got[1], tuple) and got[1][0] == "aborted"
    assert (two["preemptions"], two["prefix_cache"]["hits"]) == (one["preemptions"], one["prefix_cache"]["hits"])


def test_prompt_logprobs_over_two_ranks_equal_one_process(tmp_path):
    """Rank 0 asks every rank for the lm_head of the prompt rows, chunk by chunk, as it does for the
    sampled rows: the same entries as one process, through chunked prefill and preemption."""
    path = save_tiny_hf_llama(tmp_path / "m", heads=4, kv_heads=2, hidden=64, layers=2, vocab=257)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 257, (n,), generator=g).tolist() for n in (45, 30, 52)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=3)
    runs = []
    for tp in (1, 2):
        engine = random_engine(path, 2, tp)
        try:
            ids = [engine.add_request(p, params) for p in prompts]
            outs = {}
            while engine.has_unfinished_requests():
                outs.update((o.request_id, o) for o in engine.step() if o.finished)
            preempted = engine.stats()["preemptions"]
        finally:
            engine.close()
        runs.append(([outs[i].prompt_logprobs for i in ids], preempted))
    (want, one), (got, two) = runs
    assert one > 0 and two == one
    for w, g in zip(want, got):
        assert len(g) == len(w) and g[0] is w[0] is None
        assert [(e.token_id, e.rank, [t for t, _ in e.top]) for e in g[1:]] == \
            [(e.token_id, e.rank, [t for t, _ in e.top]) for e in w[1:]]
        assert [e.logprob for e in g[1:]] == pytest.approx([e.logprob for e in w[1:]], abs=1e-4)


def test_decode_graph_replays_on_every_rank_match_one_process(tmp_path, monkeypatch):
    """Rank 0 captures decode graphs, every other rank the same sizes in the same order, and each
    decode step replays the padded size on every rank (rank 0 announces it; the others pad their
    batch as rank 0 did and take rank 0's token ids inside the replay). On the CPU a replay reruns
    the forward on the graph's input buffers, so the protocol runs here as it would on GPUs."""
    path = save_tiny_hf_llama(tmp_path / "m", heads=4, kv_heads=2, hidden=64, layers=2, vocab=257)
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 257, (32,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 257, (n,), generator=g).tolist() for n in (5, 9, 2)]
    prompts += [torch.randint(3, 257, (n,), generator=g).tolist() for n in (40, 7)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = random_engine(path, 2, 1)  # plain eager steps
    try:
        want = finish(engine, prompts, params, abort={1: 12})
    finally:
        engine.close()
    monkeypatch.setattr(model_runner, "decode_graphs_supported", lambda device, attn: True)
    engine = random_engine(path, 2, 2)
    procs = list(engine.tp.procs.values())
    try:
        graphs = engine.runner.graphs
        assert graphs is not None and graphs.sizes == [1, 2, 4]
        batches = []
        run = graphs.run
        graphs.run = lambda staging, ids, slots, lens: (batches.append(len(ids)), run(staging, ids, slots, lens))[1]
        got = finish(engine, prompts, params, abort={1: 12})
        stats = engine.stats()
    finally:
        engine.close()
    assert got == want
    assert len(batches) > 10 and 3 in batches  # decode steps replayed, one of them padded to 4 rows
    assert stats["preemptions"] > 0
    assert not any(p.is_alive() for p in procs)


def test_every_rank_grows_and_gives_back_its_pool_with_rank_0():
    page = 16 * 2 * 2 * 1 * 32 * 4  # 16 tokens of tiny-llama's one KV head a rank, 2 layers, K and V, float32
    engine = tp_engine(model="tiny-llama", load_format="dummy", max_model_len=64, max_num_seqs=4, page_size=page,
                       kv_cache_memory=6 * page, kv_cache_max_memory=40 * page, tensor_parallel_size=2)
    try:
        prompts = [[3 + i] * 30 for i in range(4)]
        finish(engine, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        grown = engine.stats()["rank_pools"]
        assert grown[0]["total_pages"] > 6 and grown[0]["total_pages"] == grown[1]["total_pages"]
        assert engine.release_idle_memory() > 0
        idle = engine.stats()["rank_pools"]
        assert idle[0]["total_pages"] < grown[0]["total_pages"]
        assert {(r["total_pages"], r["used_pages"]) for r in idle} == {(idle[0]["total_pages"], idle[0]["used_pages"])}
        assert finish(engine, prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finally:
        engine.close()


# ----- failures -----------------------------------------------------------------------------
def dummy_tp2(**kwargs) -> LLMEngine:
    return tp_engine(model="tiny-llama", load_format="dummy", max_model_len=64, max_num_seqs=2,
                     kv_cache_memory=8 << 20, tensor_parallel_size=2, **kwargs)


def test_a_rank_that_raises_stops_the_engine_with_its_error():
    engine = dummy_tp2()
    procs = list(engine.tp.procs.values())
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        engine.add_request([5, 6, 7], params)
        engine.step()
        engine.tp.pool.ops.append(("map", [(7, 0, 1)]))  # rank 1 has no 8th vTensor: it raises IndexError
        with pytest.raises(TensorParallelError, match=r"tensor-parallel rank 1 failed: IndexError"):
            while engine.has_unfinished_requests():
                engine.step()
        with pytest.raises(TensorParallelError, match="rank 1 failed"):  # and it stays stopped
            engine.step()
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)


def test_a_rank_that_dies_stops_the_engine_naming_it():
    engine = dummy_tp2()
    procs = list(engine.tp.procs.values())
    try:
        engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        engine.step()
        os.kill(procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match="tensor-parallel rank 1 died \\(killed by SIGKILL\\)"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 10
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)


class NeverDone:
    """A step's device event whose kernels wait for a peer that is gone, as NCCL's would: it
    never completes."""

    def query(self) -> bool:
        return False


def waiting_for_the_device(engine: LLMEngine):
    """What rank 0's engine thread does between launching a step and using its tokens."""
    from glakeserve.model_runner import LaunchedStep

    return engine.runner.read(LaunchedStep(None, None, NeverDone(), "graph"))


def test_a_rank_that_dies_is_noticed_at_once_and_ends_rank_0s_wait():
    """The watcher sees the process end and aborts the communicator (under NCCL that ends the
    kernels waiting for it, and every host wait on them), destroying the CUDA graphs first; a wait
    for the device then raises, naming the rank, instead of polling on."""
    engine = dummy_tp2()
    procs = list(engine.tp.procs.values())
    released = []
    engine.tp.before_abort.append(lambda: released.append(time.monotonic()))
    try:
        os.kill(procs[0].pid, signal.SIGKILL)
        start = time.monotonic()
        while not engine.tp.lost and time.monotonic() - start < 5:
            time.sleep(0.01)
        assert engine.tp.lost and engine.tp.aborted and len(released) == 1
        released.clear()
        with pytest.raises(TensorParallelError, match=r"tensor-parallel rank 1 died \(killed by SIGKILL\)"):
            waiting_for_the_device(engine)
        assert time.monotonic() - start < 5
        with pytest.raises(TensorParallelError, match="rank 1 died"):  # and every later call
            engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            engine.step()
    finally:
        engine.close()
    assert released and not any(p.is_alive() for p in procs)  # close releases graphs again (a no-op then)


def test_a_rank_that_fails_while_rank_0_waits_for_the_device_is_named():
    engine = dummy_tp2()
    procs = list(engine.tp.procs.values())
    try:
        engine.tp.send(("ops", [("map", [(7, 0, 1)])]))  # rank 1 has no 8th vTensor: it raises IndexError
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"tensor-parallel rank 1 failed: IndexError"):
            waiting_for_the_device(engine)
        assert time.monotonic() - start < 10
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)


def test_a_rank_that_hangs_ends_rank_0s_wait_for_the_device_after_the_timeout():
    engine = dummy_tp2(tensor_parallel_timeout=2)
    procs = list(engine.tp.procs.values())
    try:
        os.kill(procs[0].pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank\(s\) 1 stopped answering: rank 0's step did not complete "
                                                      r"within tensor_parallel_timeout=2 s \(hung\?\)"):
            waiting_for_the_device(engine)
        assert 2 <= time.monotonic() - start < 10
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)


def test_a_hung_rank_times_out():
    engine = dummy_tp2(tensor_parallel_timeout=2)
    procs = list(engine.tp.procs.values())
    try:
        engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        os.kill(procs[0].pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank\(s\) 1 stopped answering.*hung"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 20
    finally:
        engine.close()
    assert not any(p.is_alive() for p in procs)


ORPHAN_SCRIPT = """
import signal, sys, time
# Ctrl-C as in a terminal: a shell that starts the tests in the background hands them SIGINT ignored,
# and a Python started with it ignored keeps ignoring it
signal.signal(signal.SIGINT, signal.default_int_handler)
from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
if __name__ == "__main__":
    llm = LLM("tiny-llama", load_format="dummy", max_model_len=64, max_num_seqs=2, kv_cache_memory=8 << 20,
              tensor_parallel_size=2, tensor_parallel_timeout=30)
    print(" ".join(str(p.pid) for p in llm.engine.tp.procs.values()), flush=True)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # busy: a signal lands mid-step as often as not
        llm.generate([[5, 6, 7]] * 2, params)
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_no_rank_outlives_the_user_process(how):
    """SIGKILL: rank 0 gets no chance to stop the others. Ctrl-C: SIGINT reaches the whole process
    group; the other ranks ignore it and rank 0's exit takes them down."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1 and not any(gone(p) for p in pids)
        time.sleep(0.5)  # generating
        if how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=20) != 0
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(gone(p) for p in pids)


def test_cli_takes_tensor_parallel_size(smollm2_dir):
    from typer.testing import CliRunner

    from glakeserve.cli.app import app

    runner = CliRunner()
    out = runner.invoke(app, ["bench", "--model", "tiny-llama", "--load-format", "dummy", "--dataset", "random",
                              "--num-prompts", "3", "--input-len", "12", "--output-len", "4", "-tp", "2"])
    assert out.exit_code == 0, out.output
    assert "Throughput" in out.output
    out = runner.invoke(app, ["chat", "--tensor-parallel-size", "2", "Hi"])  # SmolLM2's 9 heads
    text = " ".join(out.output.split())  # the console wraps lines
    assert out.exit_code == 2 and "sizes that work for it: 1, 3" in text and "Traceback" not in text
    out = runner.invoke(app, ["bench", "--backend", "hf", "-tp", "3"])
    assert out.exit_code == 2 and "one device" in out.output
