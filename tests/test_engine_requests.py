"""Bad requests get clear errors and the engine keeps serving the others; abort frees memory at once."""

import pytest

from glakeserve.sampling import SamplingParams


def test_bad_prompts_are_rejected_and_the_others_go_on(smol_llm):
    engine = smol_llm.engine
    good = engine.add_request("Count to five:", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(ValueError, match=r"the prompt has 600 tokens but max_model_len is 512: .* shorten"):
        engine.add_request([5] * 600, SamplingParams())
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 49152\)"):
        engine.add_request([1, 2, 99999], SamplingParams())
    with pytest.raises(ValueError, match="a prompt must be a string or a list of token ids"):
        engine.add_request(3.5, SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("again", SamplingParams(), request_id=good)
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == good and out.finished:
                done = out
    assert done is not None and len(done.token_ids) == 12


def test_generate_names_the_bad_prompt_and_queues_nothing(smol_llm):
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        smol_llm.generate(["fine", ""], SamplingParams(max_tokens=4))
    assert not smol_llm.engine.has_unfinished_requests()


def test_prompt_just_under_the_limit_generates_until_the_limit(smol_llm):
    out = smol_llm.generate([[7] * 509], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3  # 509 + 3 = max_model_len


def test_abort_frees_pages_at_once(smol_llm):
    engine = smol_llm.engine
    rid = engine.add_request("Tell me everything about the ocean.",
                             SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))
    for _ in range(4):
        engine.step()
    req = engine.requests[rid]
    slot = req.slot
    assert engine.stats()["kv_pages"]["requests"] > 0
    out = engine.abort_request(rid)
    assert out.finished and out.finish_reason == "abort"
    # no request holds a page now: the slot keeps its KV as cache, reclaimable by any request
    assert slot.owner is None and engine.stats()["kv_pages"]["requests"] == 0
    engine.kv.check_integrity(engine.scheduler.tokens_held())
    assert engine.abort_request(rid) is None  # unknown now
    assert not engine.has_unfinished_requests()


def test_chat_applies_the_template(smol_llm):
    out = smol_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=20))[0]
    assert "Paris" in out.text
    with pytest.raises(ValueError, match="needs 'role' and 'content'"):
        smol_llm.chat([{"text": "hi"}])


def test_sampling_values_the_vocabulary_cannot_serve_are_refused(smol_llm):
    vocab = smol_llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match=f"top_k must be at most the vocabulary size \\({vocab}\\)"):
        smol_llm.generate(["hi"], SamplingParams(top_k=vocab + 1))
    with pytest.raises(ValueError, match=f"stop_token_ids must be in \\[0, {vocab}\\)"):
        smol_llm.generate(["hi"], SamplingParams(stop_token_ids=[vocab + 7], min_tokens=2, max_tokens=4))
    assert not smol_llm.engine.has_unfinished_requests()


def test_an_aborted_request_returns_the_text_so_far(smol_llm):
    engine = smol_llm.engine
    rid = engine.add_request("Count from one to fifty:", SamplingParams(temperature=0, max_tokens=100,
                                                                       ignore_eos=True), stream=False)
    for _ in range(6):
        engine.step()
    out = engine.abort_request(rid)
    assert out.finish_reason == "abort" and out.token_ids
    assert out.text == smol_llm.tokenizer.decode(out.token_ids, True) and out.text
