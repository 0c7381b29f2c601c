"""Prompt logprobs (SamplingParams.prompt_logprobs) against the log-softmax of HF transformers' forward
pass over the prompt: raw (no temperature, penalties or bias), exactly one entry per prompt token
whatever splits the prefill (chunked prefill, preemption and recompute, a step in flight) and whatever
the prefix cache holds."""

import pytest
import torch

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.prompt_logprobs import compute
from glakeserve.sampling import SamplingParams
from helpers import save_tiny_hf_llama

TOL = 2e-3


def hf_log_softmax(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row p is the distribution of prompt token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def check(entries, prompt: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for p, e in enumerate(entries[1:]):
        token = prompt[p + 1]
        assert e.token_id == token
        assert e.logprob == pytest.approx(float(ref[p, token]), abs=TOL)
        assert int((ref[p] > ref[p, token] + TOL).sum()) + 1 <= e.rank <= int((ref[p] >= ref[p, token] - TOL).sum())
        top = ref[p].topk(k)
        assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=TOL)
        if k:  # ids of the best (near-ties aside)
            assert e.top[0][0] == int(top.indices[0]) or top.values[0] - top.values[1] < TOL


def test_prompt_logprobs_are_hf_log_softmax_raw(smol_llm, hf_smollm2):
    """Sampling settings (temperature, penalties, logit bias) change the output's logprobs, never the
    prompt's."""
    model, tok = hf_smollm2
    prompts = [tok.encode("The three primary colours are red, yellow and"), tok.encode("def fibonacci(n):")]
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, logit_bias={11: 5.0}, max_tokens=3,
                             prompt_logprobs=5, seed=1),
              SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)]
    outs = smol_llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        check(out.prompt_logprobs, prompt, hf_log_softmax(model, prompt), p.prompt_logprobs)
    plain = smol_llm.generate(prompts[:1], SamplingParams(max_tokens=2))[0]
    assert plain.prompt_logprobs is None


def test_streamed_with_the_first_output_and_one_token_prompts(smol_llm):
    outs = list(smol_llm.generate_stream([[1, 504, 3458, 314, 4866], [28]],
                                         SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1)))
    first = {}
    for o in outs:
        first.setdefault(o.request_id, o)
    assert [len(o.prompt_logprobs) for o in first.values()] == [5, 1]
    assert all(o.prompt_logprobs is not None for o in outs)
    assert first[outs[0].request_id].prompt_logprobs[1].token_id == 504


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama (vocab 257, 512 bytes of KV a token: 8 tokens a 4 KiB page) and HF's copy."""
    from transformers import LlamaForCausalLM

    path = save_tiny_hf_llama(tmp_path_factory.mktemp("m"), heads=4, kv_heads=2, hidden=64, layers=2, vocab=257)
    return path, LlamaForCausalLM.from_pretrained(path).float().eval()


def tiny_engine(path, pages: int = 200, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), max_model_len=96, max_num_seqs=4, page_size=4096,
                                  kv_cache_memory=pages * 4096, check_integrity=True, **kw))


def prompts_of(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 257, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_prefill_and_preemption_keep_one_entry_per_token(tiny, async_scheduling):
    """A 5-token budget splits every prompt over steps; 14 pages for four requests growing to ~70
    tokens preempt some mid-prefill (their rows so far kept, the rest computed once on recompute)."""
    path, model = tiny
    prompts = prompts_of(0, [50, 37, 61, 44])
    eng = tiny_engine(path, pages=14, max_num_batched_tokens=5, async_scheduling=async_scheduling,
                      lookahead_tokens=4)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=3)
    ids = [eng.add_request(p, params) for p in prompts]
    outs, mid_prefill = {}, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        mid_prefill += sum(1 for r in eng.scheduler.waiting if r.num_preemptions and
                           0 < r.num_prompt_rows < len(r.prompt_token_ids) - 1)
    assert eng.stats()["preemptions"] > 0 and mid_prefill > 0
    eng.close()
    for prompt, rid in zip(prompts, ids):
        check(outs[rid].prompt_logprobs, prompt, hf_log_softmax(model, prompt), 3)
        assert outs[rid].num_output_tokens == 20


def test_a_warm_prefix_cache_still_gives_every_prompt_logprob(tiny):
    """A repeated prompt computes its whole prompt again (no cache hit) and gets the same logprobs;
    its pages still serve a request that does not ask for them."""
    path, model = tiny
    prompt = prompts_of(1, [41])[0]
    eng = tiny_engine(path, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    run = lambda p: finish(eng, prompt, p)  # noqa: E731
    first, again = run(params), run(params)
    plain = run(SamplingParams(temperature=0, max_tokens=4))
    eng.close()
    check(first.prompt_logprobs, prompt, hf_log_softmax(model, prompt), 2)
    assert again.num_cached_tokens == 0 and first.num_cached_tokens == 0
    assert [(e.token_id, e.rank, [t for t, _ in e.top]) for e in again.prompt_logprobs[1:]] == \
        [(e.token_id, e.rank, [t for t, _ in e.top]) for e in first.prompt_logprobs[1:]]
    assert [e.logprob for e in again.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in first.prompt_logprobs[1:]], abs=1e-5)
    assert plain.num_cached_tokens == 40 and again.token_ids == first.token_ids == plain.token_ids


def test_each_of_n_sequences_gets_them(tiny):
    path, model = tiny
    from glakeserve.llm import LLM

    llm = LLM(str(path), max_model_len=96, max_num_seqs=4, page_size=4096, kv_cache_memory=200 * 4096)
    prompt = prompts_of(2, [23])[0]
    outs = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=3, prompt_logprobs=1))
    llm.close()
    ref = hf_log_softmax(model, prompt)
    for o in outs:
        check(o.prompt_logprobs, prompt, ref, 1)


def finish(eng: LLMEngine, prompt: list[int], params: SamplingParams):
    rid = eng.add_request(prompt, params)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished and o.request_id == rid:
                out = o
    return out


def test_rows_go_through_the_lm_head_in_bounded_chunks():
    """compute() equals one pass over all rows, and never asks the lm_head for more than max_rows."""
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(30, 8, generator=g), torch.randn(8, 101, generator=g)
    rows, targets = torch.tensor([3, 4, 5, 11, 12, 20, 21, 22, 23, 29]), torch.randint(0, 101, (10,), generator=g)
    seen = []

    def logits(h):
        seen.append(h.shape[0])
        return h @ head

    values, top_ids, ranks = compute(logits, hidden, rows, targets, 10, 4, max_rows=3)
    assert seen == [3, 3, 3, 1]
    ref = torch.log_softmax(hidden[rows] @ head, dim=-1)
    assert torch.allclose(values[:, 0], ref.gather(1, targets[:, None])[:, 0])
    assert torch.allclose(values[:, 1:], ref.topk(4).values) and torch.equal(top_ids, ref.topk(4).indices)
    assert torch.equal(ranks, (ref > ref.gather(1, targets[:, None])).sum(-1) + 1)


def test_prompt_logprobs_validation():
    for bad in (21, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match=r"prompt_logprobs must be an integer in \[0, 20\].*got"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
