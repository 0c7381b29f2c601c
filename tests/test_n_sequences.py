"""n > 1: one prefill, then n sequences that decode on their own with seeds seed + i. The sequences
after the first wait for the first's prompt to be launched and then alias its KV pages through the
prefix cache."""

import pytest

from glakeserve.sampling import SamplingParams

PROMPT = "Here is a long list of fruits and vegetables that grow well in a temperate garden, with notes: "


def test_n_greedy_sequences_are_identical_and_share_the_prompt(smol_llm):
    tok = smol_llm.tokenizer
    prompt = tok.encode(PROMPT * 6)
    per_page = smol_llm.engine.stats()["tokens_per_page"]
    assert len(prompt) > 2 * per_page
    outs = smol_llm.generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.index for o in outs] == [0, 1, 2]
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids
    full_pages = (len(prompt) - 1) // per_page * per_page
    assert outs[0].num_cached_tokens < full_pages  # the first computed its prompt (unless cached before)
    assert outs[1].num_cached_tokens == outs[2].num_cached_tokens == full_pages  # the others aliased it


def test_n_sampled_sequences_differ_and_follow_seed_plus_i(smol_llm):
    prompt = smol_llm.tokenizer.encode("Write a short poem about the sea.")
    params = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=41, ignore_eos=True)
    outs = smol_llm.generate([prompt], params)
    assert len({tuple(o.token_ids) for o in outs}) == 3
    for i, out in enumerate(outs):  # sequence i is exactly a lone request seeded seed + i
        alone = smol_llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=12, seed=41 + i,
                                                           ignore_eos=True))[0]
        assert alone.token_ids == out.token_ids


def test_n_with_several_prompts_and_streaming(smol_llm):
    prompts = [[1, 504, 3458, 314, 260], [1, 504, 3458, 315]]
    outs = smol_llm.generate(prompts, SamplingParams(n=2, temperature=0, max_tokens=4, ignore_eos=True))
    assert [(o.prompt_token_ids, o.index) for o in outs] == [(prompts[0], 0), (prompts[0], 1), (prompts[1], 0),
                                                             (prompts[1], 1)]
    streamed: dict[str, list] = {}
    for out in smol_llm.generate_stream(prompts[:1], SamplingParams(n=2, temperature=0, max_tokens=4, ignore_eos=True)):
        streamed.setdefault(out.request_id, []).extend(out.delta_token_ids)
    assert sorted(streamed.values()) == [outs[0].token_ids, outs[1].token_ids]


def test_n_validation(smol_llm):
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 128\], got 0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="add_request adds one sequence, got n=2"):
        smol_llm.engine.add_request([1, 2, 3], SamplingParams(n=2))
