"""The API's sampling features on a GPU (`gpu` marker), where the sampler runs its Triton pass, the
logprobs and grammar masks cross pinned memory without waiting, and decode runs as CUDA graphs:
logprobs against the CPU engine on the same weights, logit_bias, n sequences sharing a prompt, and
grammar-constrained outputs that match their pattern, with and without a step in flight."""

import json
import random
import re

import pytest

from glakeserve.llm import LLM
from glakeserve.sampling import SamplingParams
from glakeserve.structured import GuidedDecoding
from helpers import save_tiny_hf_llama

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_hf_llama(tmp_path_factory.mktemp("gpu-api"), seed=random.getrandbits(16), heads=8, kv_heads=2,
                              hidden=256, layers=4, vocab=1000, max_pos=1024)


def llm(model, device: str) -> LLM:
    return LLM(str(model), dtype="float32", device=device, max_model_len=256, max_num_seqs=8,
               kv_cache_memory=256 << 20, check_integrity=True)


def on_cpu_and_gpu(model, prompts, params) -> tuple[list, list]:
    """The same requests through a CPU engine, then a GPU engine, on the same weights."""
    got = []
    for device in ("cpu", "cuda"):
        engine = llm(model, device)
        try:
            got.append(engine.generate(prompts, params))
        finally:
            engine.close()
    return got[0], got[1]


def test_logprobs_on_gpu_equal_the_cpu_engine(tiny):
    rng = random.Random()
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (5, 40, 130)]
    params = [SamplingParams(temperature=0, max_tokens=10, logprobs=k, ignore_eos=True) for k in (0, 5, 20)]
    for cpu, gpu in zip(*on_cpu_and_gpu(tiny, prompts, params)):
        assert gpu.token_ids == cpu.token_ids
        for a, b in zip(cpu.logprobs, gpu.logprobs):
            assert b.token_id == a.token_id and b.logprob == pytest.approx(a.logprob, abs=1e-3)
            assert [t for t, _ in b.top] == [t for t, _ in a.top]
            assert [v for _, v in b.top] == pytest.approx([v for _, v in a.top], abs=1e-3)


def test_penalties_and_prompt_logprobs_on_gpu_equal_the_cpu_engine(tiny):
    """Penalty counts live on the device (updated by each step's tokens, a step in flight) and
    prompt logprobs cross pinned memory: both against the CPU engine on the same weights."""
    rng = random.Random()
    prompts = [[rng.randrange(3, 60) for _ in range(n)] for n in (7, 50, 140)]  # small ids: repeats
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.4, presence_penalty=0.3, prompt_logprobs=k) for k in (0, 3, 5)]
    for cpu, gpu in zip(*on_cpu_and_gpu(tiny, prompts, params)):
        assert gpu.token_ids == cpu.token_ids
        assert len(gpu.prompt_logprobs) == len(cpu.prompt_logprobs) and gpu.prompt_logprobs[0] is None
        for a, b in zip(cpu.prompt_logprobs[1:], gpu.prompt_logprobs[1:]):
            assert b.token_id == a.token_id and b.logprob == pytest.approx(a.logprob, abs=1e-3)
            assert [t for t, _ in b.top] == [t for t, _ in a.top]


def test_logit_bias_and_n_sequences_on_gpu(tiny):
    engine = llm(tiny, "cuda")
    try:
        prompt = [random.randrange(3, 1000) for _ in range(33)]
        (biased,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                             logit_bias={777: 100.0}))
        assert biased.token_ids == [777] * 8
        outs = engine.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True))
        assert [o.index for o in outs] == [0, 1, 2]
        assert len({tuple(o.token_ids) for o in outs}) == 1  # greedy: three equal sequences
        seeded = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12,
                                                          ignore_eos=True))
        assert len({tuple(o.token_ids) for o in seeded}) > 1  # seed + i per sequence: they differ
    finally:
        engine.close()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_grammar_constrained_outputs_on_gpu(async_scheduling):
    """Random weights (tiny-llama, SmolLM2's tokenizer): whatever the model prefers, the mask must
    leave only outputs of the grammar, finished by EOS once the grammar is complete."""
    pytest.importorskip("xgrammar", reason="xgrammar is not installed (the GPU image lacks it: scripts/gpu_suite.sh "
                                           "installs it from .carry/xg)")
    engine = LLM("tiny-llama", load_format="dummy", device="cuda", max_model_len=256, max_num_seqs=8,
                 async_scheduling=async_scheduling, check_integrity=True)
    try:
        tok = engine.tokenizer
        prompts = [tok.encode(t) for t in ("Pick one:", "A code:", "Give JSON:", "Free text:")]
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        params = [SamplingParams(temperature=0.8, seed=1, max_tokens=40,
                                 guided=GuidedDecoding("choice", ("red", "green", "blue"))),
                  SamplingParams(temperature=0.8, seed=2, max_tokens=40,
                                 guided=GuidedDecoding("regex", r"[0-9]{3}-[a-z]{2}")),
                  SamplingParams(temperature=0.8, seed=3, max_tokens=80, guided=GuidedDecoding("json", json.dumps(schema))),
                  SamplingParams(temperature=0.8, seed=4, max_tokens=20, ignore_eos=True)]
        choice, code, obj, free = engine.generate(prompts, params)
        assert choice.text in ("red", "green", "blue") and choice.finish_reason == "stop"
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", code.text) and code.finish_reason == "stop"
        if obj.finish_reason == "stop":  # (random weights may ramble in whitespace until max_tokens)
            assert set(json.loads(obj.text)) == {"ok"}
        assert len(free.token_ids) == 20
    finally:
        engine.close()
