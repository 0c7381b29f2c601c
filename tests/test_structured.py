"""Structured outputs with xgrammar: JSON schemas (nested objects, enums, arrays), regexes and choices
constrain SmolLM2's output through a bitmask applied to the logits; constrained and unconstrained
requests share a batch without changing the unconstrained ones, with and without async scheduling."""

import json
import re

import jsonschema
import pytest

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams
from glakeserve.structured import GuidedDecoding

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "colour", "pets", "address"],
    "additionalProperties": False,
}


def chat_ids(llm, text: str) -> list[int]:
    return llm.tokenizer.chat_ids([{"role": "user", "content": text}])


def test_json_schema_output_validates(smol_llm):
    prompts = [chat_ids(smol_llm, f"Describe person number {i} as JSON.") for i in range(4)]
    params = [SamplingParams(temperature=t, seed=i, max_tokens=200, guided=GuidedDecoding.json_schema(SCHEMA))
              for i, t in enumerate((0.0, 0.7, 1.0, 1.0))]
    for out in smol_llm.generate(prompts, params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_regex_and_choice(smol_llm):
    prompt = chat_ids(smol_llm, "Give me a code.")
    choices = ("yes", "no", "maybe", "café", 'say "hi"', "😀")  # escapes and characters past ASCII
    outs = smol_llm.generate([prompt] * 5, [
        SamplingParams(temperature=1.0, seed=1, max_tokens=20, guided=GuidedDecoding("regex", r"[A-Z]{3}-[0-9]{2,4}")),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, guided=GuidedDecoding("choice", choices)),
        SamplingParams(temperature=0, max_tokens=60, guided=GuidedDecoding("json_object")),
        SamplingParams(temperature=1.0, seed=3, max_tokens=30, guided=GuidedDecoding(
            "grammar", 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z]+ | [0-9]+')),
        SamplingParams(temperature=1.0, seed=4, max_tokens=30, n=4, guided=GuidedDecoding("choice", choices)),
    ])
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", outs[0].text), outs[0].text
    assert outs[1].text in choices and outs[1].finish_reason == "stop"
    assert outs[2].finish_reason == "stop" and isinstance(json.loads(outs[2].text), dict), outs[2].text
    assert re.fullmatch(r"\((?:[a-z]+|[0-9]+)(?:,(?:[a-z]+|[0-9]+))*\)", outs[3].text), outs[3].text
    assert all(o.text in choices for o in outs[4:]) and len(outs) == 8  # every one of n gets its own matcher


def test_unconstrained_outputs_do_not_change_in_a_mixed_batch(smol_llm):
    plain = [chat_ids(smol_llm, q) for q in ("Name three rivers.", "What is two plus two?", "Say hello in Spanish.")]
    free = [SamplingParams(temperature=0, max_tokens=16), SamplingParams(temperature=0.8, seed=3, max_tokens=16),
            SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.2)]
    alone = [o.token_ids for o in smol_llm.generate(plain, free)]
    constrained = [chat_ids(smol_llm, f"Describe person {i} as JSON.") for i in range(3)]
    guided = [SamplingParams(temperature=0.7, seed=i, max_tokens=40, guided=GuidedDecoding.json_schema(SCHEMA))
              for i in range(3)]
    mixed = smol_llm.generate(constrained[:2] + plain + constrained[2:], guided[:2] + free + guided[2:])
    assert [o.token_ids for o in mixed[2:5]] == alone


def test_async_scheduling_reads_before_masking(smollm2_dir):
    """With a step in flight the mask of the next step needs the token being sampled: the engine
    launches the next forward, reads the step in flight, advances the matchers, then samples; the
    outputs equal the serial engine's (with penalties, whose counts the device keeps, too)."""
    results = {}
    for mode in (False, True):
        eng = LLMEngine(EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_memory=48 << 20,
                                     async_scheduling=mode, check_integrity=True))
        ids = [eng.add_request(eng.tokenizer.chat_ids([{"role": "user", "content": q}]), p) for q, p in (
            ("Describe a person as JSON.", SamplingParams(temperature=0.9, seed=7, max_tokens=200,
                                                          guided=GuidedDecoding.json_schema(SCHEMA))),
            ("Tell me a joke.", SamplingParams(temperature=0.9, seed=8, max_tokens=24)),
            ("A date?", SamplingParams(temperature=1.0, seed=9, max_tokens=30, frequency_penalty=1.0,
                                       guided=GuidedDecoding("regex", r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"))),
        )]
        done = {}
        while eng.has_unfinished_requests():
            done.update({o.request_id: o for o in eng.step() if o.finished})
        results[mode] = [(done[i].token_ids, done[i].finish_reason) for i in ids]
        eng.close()
    assert results[True] == results[False]
    assert results[True][0][1] == "stop"


def test_what_cannot_be_compiled_or_combined_is_refused(smol_llm):
    with pytest.raises(ValueError, match=r"the JSON schema cannot be compiled: .*strin"):
        smol_llm.generate([[1, 2, 3]], SamplingParams(guided=GuidedDecoding.json_schema({"type": "strin"})))
    with pytest.raises(ValueError, match=r"the regex cannot be compiled: .*parenthesis"):
        smol_llm.generate([[1, 2, 3]], SamplingParams(guided=GuidedDecoding("regex", "(ab")))
    with pytest.raises(ValueError, match="cannot be combined with ignore_eos or min_tokens"):
        SamplingParams(guided=GuidedDecoding("json_object"), ignore_eos=True)
    with pytest.raises(ValueError, match="guided choice must be a non-empty list"):
        GuidedDecoding("choice", ())


def test_chat_set_format_json(smol_llm):
    """`/set format json` in glake chat: replies go through the same structured output, and are JSON
    objects until `/set format off`."""
    import io

    from rich.console import Console

    from glakeserve.cli.chat import ChatSession

    shown = io.StringIO()
    chat = ChatSession(smol_llm, Console(file=shown, width=200), params=SamplingParams(temperature=0, max_tokens=120),
                       live_memory=False)
    questions = ['Give me a JSON object with the keys "city" and "country" for the capital of France.',
                 "Describe a cat as a JSON object with its name and age."]
    for line in ["/set format json", questions[0], "/clear", questions[1], "/set format off", "/show"]:
        assert chat.handle(line)
    assert "format = json" in shown.getvalue() and "format = off" in shown.getvalue()
    reply = chat.messages[-1]["content"]
    assert isinstance(json.loads(reply), dict) and chat.params.guided is None, reply
    chat.handle("/clear")
    chat.handle(questions[1])  # the same question, free text again
    assert chat.messages[-1]["content"] != reply


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000])
def test_bitmask_masks_exactly_the_disallowed_tokens(vocab):
    """Bit j of word w allows token 32w + j (the sign bit included); rows without a grammar are
    untouched. Checked against a per-token reference on random masks."""
    import torch

    from glakeserve.sampling import _apply_token_bitmask

    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    rows = [0, 2, 3]
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=g)
    bitmask[0] = -1  # every token allowed
    masked = logits.clone()
    _apply_token_bitmask(masked, rows, bitmask, lambda v, dtype: torch.tensor(v, dtype=dtype))
    for r in range(5):
        for t in range(vocab):
            if r in rows:
                word = int(bitmask[rows.index(r), t // 32]) & 0xFFFFFFFF
                allowed = (word >> (t % 32)) & 1
            else:
                allowed = 1
            assert masked[r, t] == (logits[r, t] if allowed else float("-inf")), (r, t)
