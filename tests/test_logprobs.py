"""Logprobs computed on the device from the logits that were sampled, against the log-softmax of HF
transformers' forward pass over the same tokens (SmolLM2, float32 on the CPU)."""

import pytest
import torch

from glakeserve.sampling import SamplingParams


def reference(hf_smollm2, prompt: list[int], output: list[int], temperature: float) -> torch.Tensor:
    """[len(output), vocab]: HF's log-softmax at each output position, at this temperature."""
    model, _ = hf_smollm2
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits / (temperature or 1.0), dim=-1)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_hf_log_softmax(smol_llm, hf_smollm2, temperature):
    tok = hf_smollm2[1]
    prompts = [tok.encode("The three primary colours are"), tok.encode("def fibonacci(n):")]
    params = [SamplingParams(temperature=temperature, max_tokens=12, logprobs=5, seed=3, ignore_eos=True),
              SamplingParams(temperature=temperature, max_tokens=12, logprobs=0, seed=4, ignore_eos=True)]
    outs = smol_llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs):
        ref = reference(hf_smollm2, prompt, out.token_ids, temperature)
        assert len(out.logprobs) == len(out.token_ids) == 12
        for pos, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert lp.token_id == token
            assert lp.logprob == pytest.approx(float(ref[pos, token]), abs=2e-3)
            assert len(lp.top) == p.logprobs
            if p.logprobs:
                top = ref[pos].topk(p.logprobs)
                assert [lp for _, lp in lp.top] == pytest.approx(top.values.tolist(), abs=2e-3)
                assert lp.top[0][0] == int(top.indices[0])
        if temperature == 0:  # greedy picks the top token, so its logprob is the top one's
            assert all(lp.top[0][0] == lp.token_id for lp in out.logprobs if lp.top)


def test_logprobs_only_where_asked_and_streamed_with_their_tokens(smol_llm):
    prompts = [[1, 504, 3458, 314], [1, 504, 3458, 315]]
    params = [SamplingParams(temperature=0, max_tokens=6, logprobs=2), SamplingParams(temperature=0, max_tokens=6)]
    by_id: dict[str, list] = {}
    for out in smol_llm.generate_stream(prompts, params):
        by_id.setdefault(out.request_id, []).append(out)
    first, second = by_id.values()
    assert all(o.delta_logprobs is not None and len(o.delta_logprobs) == len(o.delta_token_ids) for o in first)
    assert [lp.token_id for o in first for lp in o.delta_logprobs] == first[-1].token_ids
    assert first[-1].logprobs is not None and len(first[-1].logprobs) == 6
    assert all(o.logprobs is None and o.delta_logprobs is None for o in second)


def test_logprobs_validation():
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\]"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\]"):
        SamplingParams(logprobs=-1)
