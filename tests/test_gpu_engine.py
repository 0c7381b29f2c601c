"""The engine on a GPU (`gpu` marker): logits against HF transformers built from the same random
weights, greedy output identical to HF with CUDA graphs on, the same output from every KV layout, and
no host sync inside a decode step."""

import random

import pytest
import torch

from glakeserve.attention import cudnn_prefill
from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams
from helpers import DirectRunner, save_tiny_hf_llama

pytestmark = pytest.mark.gpu

SHAPE = dict(heads=8, kv_heads=2, hidden=256, layers=4, vocab=1000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_hf_llama(tmp_path_factory.mktemp("gpu-tiny"), seed=random.getrandbits(16), max_pos=1024, **SHAPE)
    from transformers import LlamaForCausalLM

    return path, LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()


@pytest.mark.parametrize("layout", ["token-major", "page-major", "per-layer", "paged"])
def test_logits_match_hf_on_gpu(tiny, layout):
    path, hf = tiny
    runner = DirectRunner(path, layout, max_len=512, backend="triton", device="cuda")
    try:
        seqs = [torch.randint(3, SHAPE["vocab"], (n,)).tolist() for n in (300, 17, 129)]
        with torch.no_grad():
            ref = [hf(torch.tensor([s], device="cuda")).logits[0] for s in seqs]
        done: dict[int, int] = {}
        cut = [200, 5, 128]
        out = runner.run([(i + 1, s[:c]) for i, (s, c) in enumerate(zip(seqs, cut))], done)  # prefill, 3 slots
        for o, r, c in zip(out, ref, cut):
            torch.testing.assert_close(o, r[:c], rtol=1e-3, atol=1e-3)
        out = runner.run([(1, seqs[0][cut[0]:])], done)  # extend after a cached prefix
        torch.testing.assert_close(out[0], ref[0][cut[0]:], rtol=1e-3, atol=1e-3)
    finally:
        runner.close()


@pytest.mark.parametrize("layout,backend", [("token-major", "triton"), ("per-layer", "triton"), ("paged", "triton"),
                                            ("token-major", "cudnn"), ("per-layer", "cudnn")])
def test_bfloat16_logits_near_hf(tiny, layout, backend):
    """The 16-bit paths, against HF in float32: the strided extend kernel (token-major, per-layer), or
    cuDNN's (here from 16 new tokens on), and one-token steps through the GEMV kernel (model/gemv.py)."""
    if backend == "cudnn" and not cudnn_prefill.available():
        pytest.skip("needs nvidia-cudnn-frontend")
    path, hf = tiny
    runner = DirectRunner(path, layout, max_len=512, backend=backend, device="cuda", dtype=torch.bfloat16)
    if backend == "cudnn":
        runner.attn.prefill.min_query = 16
    try:
        seq = torch.randint(3, SHAPE["vocab"], (200,)).tolist()
        with torch.no_grad():
            ref = hf(torch.tensor([seq], device="cuda")).logits[0]
        tol = dict(atol=0.05 * float(ref.abs().max()), rtol=0.05)  # bfloat16 through 4 layers
        done: dict[int, int] = {}
        out = runner.run([(1, seq[:150])], done)  # prefill
        torch.testing.assert_close(out[0].float(), ref[:150], **tol)
        for n in range(150, 154):  # one token a step: one-row products
            out = runner.run([(1, seq[n:n + 1])], done)
            torch.testing.assert_close(out[0].float(), ref[n:n + 1], **tol)
    finally:
        runner.close()


def generate(path, layout, prompts, max_new, **kw):
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", kv_layout=layout, max_model_len=512,
                                    max_num_seqs=8, kv_cache_memory=1 << 30, check_integrity=True, **kw))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    engine.close()
    return [done[i] for i in ids]


@pytest.mark.parametrize("layout,async_scheduling,graph_tokens", [
    ("page-major", True, None), ("page-major", False, None), ("token-major", True, None), ("per-layer", True, None),
    ("paged", True, None), ("token-major", True, 0)])  # 0: prefill and mixed steps eager, no piecewise graphs
def test_greedy_identical_to_hf_with_cuda_graphs(tiny, layout, async_scheduling, graph_tokens):
    path, hf = tiny
    prompts = [torch.randint(3, SHAPE["vocab"], (n,)).tolist() for n in (5, 40, 130, 7, 64, 250)]
    max_new = 24
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=False, pad_token_id=0,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long, device="cuda"))
            expected.append(out[0, len(p):].tolist())
    got = generate(path, layout, prompts, max_new, async_scheduling=async_scheduling,
                   cuda_graph_max_tokens=graph_tokens)
    assert got == expected


def test_seeded_sampling_is_the_same_with_a_step_in_flight(tiny):
    """Overlapped scheduling reads tokens one step late; seeded sampled outputs must not change."""
    path, _ = tiny
    outs = []
    for async_scheduling in (False, True):
        engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", max_model_len=512, max_num_seqs=8,
                                        kv_cache_memory=1 << 30, async_scheduling=async_scheduling))
        params = [SamplingParams(temperature=0.9, top_p=0.95 if i % 2 else 1.0, seed=i, max_tokens=20 + i,
                                 stop_token_ids=[7]) for i in range(6)]
        ids = [engine.add_request(list(range(3, 20 + 9 * i)), p) for i, p in enumerate(params)]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        outs.append([done[i] for i in ids])
        engine.close()
    assert outs[0] == outs[1]


def test_steps_make_no_host_sync(tiny):
    path, _ = tiny
    engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", max_model_len=512, max_num_seqs=8,
                                    kv_cache_memory=1 << 30))
    for n in (5, 9, 33):
        engine.add_request(list(range(3, 3 + n)), SamplingParams(temperature=0.8, seed=n, max_tokens=40,
                                                                 ignore_eos=True))
    engine.step()  # prefill
    engine.step()
    paths = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(12):  # decode steps through CUDA graphs: nothing may wait for the GPU but the event
            if i == 5:  # and a mixed step (a prefill beside the decodes) through piecewise graphs, equally
                engine.add_request(list(range(40, 140)), SamplingParams(temperature=0.8, seed=1, max_tokens=8))
            engine.step()
            paths.append(engine.last_path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert "piecewise" in paths and "graph" in paths, paths
    assert engine.runner.graphs is not None and engine.stats()["engine_driver_calls"] == 0
    engine.close()


def test_prefix_caching_on_gpu_matches_without(tmp_path):
    """8 layers x 8 KV heads x 128 dims in float32: 64 KiB a token, 32 tokens a 2 MiB page."""
    path = save_tiny_hf_llama(tmp_path / "wide", heads=8, kv_heads=8, hidden=1024, layers=8, vocab=1000,
                              seed=random.getrandbits(16), max_pos=1024)
    base = torch.randint(3, 1000, (160,)).tolist()
    prompts = [base[:n] + torch.randint(3, 1000, (5,)).tolist() for n in (31, 32, 33, 63, 64, 65, 128)]
    outs = {}
    for caching in (True, False):
        engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_model_len=512, max_num_seqs=4,
                                        kv_cache_memory=1 << 30, enable_prefix_caching=caching,
                                        check_integrity=True))
        assert engine.stats()["tokens_per_page"] == 32
        got = []
        for p in prompts:  # one after another: each finds its predecessors' pages in the cache
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        got.append(out.token_ids)
        outs[caching] = got
        if caching:
            assert engine.stats()["prefix_cache"]["hit_tokens"] >= 32 * 8
        engine.close()
    assert outs[True] == outs[False]
