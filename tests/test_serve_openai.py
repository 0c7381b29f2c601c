"""The OpenAI API people actually use (issue 12), end to end through `glake serve` with the openai
client and raw HTTP: what vLLM's benchmark client sends, fields honoured or refused by name, the
context check, /v1/models/{id}, and cached-token usage."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI

from serve_helpers import Server

KEY = "openai-key"
MODEL = "SmolLM2-135M-Instruct"
MAX_LEN = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(["--max-model-len", str(MAX_LEN), "--max-num-seqs", "16", "--kv-cache-memory", "96MiB"],
               tmp_path_factory.mktemp("serve") / "server.log", key=KEY).wait_ready()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
        yield c


def sse_events(r: httpx.Response) -> list[dict]:
    """The data events of a streamed response, parsed the way vLLM's benchmark client does."""
    events, done = [], False
    for line in r.iter_lines():
        line = line.strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    assert done, events[-3:]
    return events


# ----- what vLLM's benchmark_serving sends ------------------------------------------------------
def test_vllm_benchmark_serving_replay(server):
    """The exact bodies of vLLM's benchmark client (backend_request_func.py): completions with
    best_of 1 and logprobs null, chat with content parts, both streamed with usage."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    completion = {"model": MODEL, "prompt": "The history of the printing press", "temperature": 0.0,
                  "best_of": 1, "max_tokens": 12, "logprobs": None, "stream": True,
                  "stream_options": {"include_usage": True}, "ignore_eos": True}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}],
            "temperature": 0.0, "max_completion_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    for path, body, piece in (("/v1/completions", completion, lambda c: c["text"]),
                              ("/v1/chat/completions", chat, lambda c: c["delta"].get("content") or "")):
        with httpx.stream("POST", server.url + path, json=body, headers=headers, timeout=120) as r:
            assert r.status_code == 200, r.read()
            events = sse_events(r)
        text = "".join(piece(e["choices"][0]) for e in events if e["choices"])
        usage = events[-1]["usage"]
        assert text and usage["completion_tokens"] == 12 and usage["prompt_tokens"] > 0, events[-1]


CHUNK_KEYS = {"id", "object", "created", "model", "system_fingerprint", "choices"}


def test_objects_have_openais_keys_and_validate_as_its_models(api):
    """Every key OpenAI always sends is there, null where we have nothing to say (refusal,
    system_fingerprint; with include_usage, usage on every chunk but the last); a stream's chunks share
    one `created`; each object validates as the openai client's model."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    text = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3}
    r = ChatCompletion.model_validate(api.post("/v1/chat/completions", json=chat).json()).model_dump(exclude_unset=True)
    assert set(r) == CHUNK_KEYS | {"usage"} and r["object"] == "chat.completion" and r["system_fingerprint"] is None
    assert set(r["choices"][0]) == {"index", "message", "logprobs", "finish_reason", "stop_reason"}  # + vLLM's
    assert set(r["choices"][0]["message"]) == {"role", "content", "refusal"} and r["choices"][0]["message"]["refusal"] is None
    r = Completion.model_validate(api.post("/v1/completions", json=text).json()).model_dump(exclude_unset=True)
    assert set(r) == CHUNK_KEYS | {"usage"} and r["system_fingerprint"] is None
    assert set(r["choices"][0]) == {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    # (completion chunks are read as Completion by the client, unvalidated: its finish_reason cannot be null)
    for path, body, model in (("/v1/chat/completions", chat, ChatCompletionChunk), ("/v1/completions", text, None)):
        for usage in (True, False):
            events = sse_events(api.post(path, json={**body, "stream": True, "n": 2,
                                                     "stream_options": {"include_usage": usage}}))
            chunks = [model.model_validate(e).model_dump(exclude_unset=True) if model else e for e in events]
            assert all(set(c) == CHUNK_KEYS | ({"usage"} if usage else set()) for c in chunks), chunks
            assert len({c["created"] for c in chunks}) == 1 and all(c["system_fingerprint"] is None for c in chunks)
            if usage:
                assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
                assert chunks[-1]["usage"]["completion_tokens"] == 6
            if model is ChatCompletionChunk:  # each choice opens with OpenAI's first delta
                assert [c["choices"][0]["delta"] for c in chunks[:2]] == [
                    {"role": "assistant", "content": "", "refusal": None}] * 2


# ----- fields: honoured or refused by name ------------------------------------------------------
REFUSED = [  # (endpoint, fields, the name the 400 must carry)
    ("chat", {"user": 7}, "user"),
    ("chat", {"parallel_tool_calls": True}, "parallel_tool_calls"),
    ("chat", {"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"logit_bias": [1, 2]}, "logit_bias"),
    ("chat", {"logit_bias": {"49152": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"12": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("completions", {"best_of": True}, "best_of"),
    ("completions", {"best_of": 1.5}, "best_of"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("chat", {"logprobs": 1}, "logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("completions", {"prompt_logprobs": True}, "prompt_logprobs"),
    ("completions", {"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
    ("chat", {"prompt_logprobs": "2"}, "prompt_logprobs"),
    ("chat", {"prompt_logprobs": 1.5}, "prompt_logprobs"),
    ("completions", {"echo": "yes"}, "echo"),
    ("chat", {"echo": True}, "echo"),
    ("chat", {"n": 129}, "n"),
    ("chat", {"n": "2"}, "n"),
    ("completions", {"n": 2, "best_of": 1}, "best_of"),
    ("completions", {"best_of": 0}, "best_of"),
    ("completions", {"best_of": 2, "stream": True}, "best_of"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("chat", {"response_format": {"type": "json_object", "extra": 1}}, "response_format"),
    ("completions", {"guided_regex": "(ab"}, "guided_regex"),
    ("completions", {"guided_choice": []}, "guided_choice"),
    ("completions", {"guided_json": "{not json"}, "guided_json"),
    ("completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("completions", {"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ("chat", {"structured_outputs": {"regex": "(ab"}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ("chat", {"structured_outputs": {"json_object": 1}}, "structured_outputs"),
    ("chat", {"structured_outputs": {}}, "structured_outputs"),
    ("chat", {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ("chat", {"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
]


@pytest.mark.parametrize("endpoint,fields,name", REFUSED)
def test_fields_are_honoured_or_refused_by_name(api, endpoint, fields, name):
    body = {"model": MODEL, "max_tokens": 2}
    if endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "hi"}]
    else:
        path, body["prompt"] = "/v1/completions", "hi"
    r = api.post(path, json={**body, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert name in error["message"] and error["param"] == name, error


def test_accepted_off_values_and_user(client):
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, best_of=1, logprobs=None, echo=False,
                                  user="someone", extra_body={"logit_bias": {}})
    assert r.usage.completion_tokens == 2
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       user="someone", tool_choice="none", response_format={"type": "text"},
                                       logprobs=False)
    assert r.usage.completion_tokens == 2


def test_tools_on_a_template_without_tool_support_are_refused(api):
    """SmolLM2's chat template ignores tools: a request with them is a 400 that says so, not a reply
    from a model that never saw them (tool_choice none and an empty list stay accepted)."""
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    for choice in ("auto", "none", "required"):
        r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": [tool],
                                                   "tool_choice": choice, "max_tokens": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "chat template has no tool support" in error["message"] and error["param"] == "tools", error
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "tools": [],
                                               "tool_choice": "none", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_max_tokens_past_the_context_is_refused_with_the_numbers(client):
    prompt = list(range(1000, 1400))  # 400 token ids
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=200)
    message = e.value.body["message"]
    assert f"maximum context length is {MAX_LEN}" in message and "400" in message and "200" in message
    assert "600" in message and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens=200"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 400}],
                                       max_completion_tokens=200)
    # a default that does not fit is refused too (completions default to 16 tokens)
    with pytest.raises(openai.BadRequestError, match="the default max_tokens of 16"):
        client.completions.create(model=MODEL, prompt=list(range(1000, 1000 + MAX_LEN - 8)))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_LEN - 400)  # fits exactly
    assert r.usage.prompt_tokens == 400


def test_models_by_id(client, api):
    assert client.models.retrieve(MODEL).id == MODEL
    r = api.get("/v1/models/gpt-4")
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]
    assert api.get("/v1/models/org/name").status_code == 404


def test_cached_tokens_in_usage(client):
    prompt = "A long and unusual preamble about lighthouses and their keepers. " * 20
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens, again.usage
    chat = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=MODEL, messages=chat, max_tokens=2)
    streamed = list(client.chat.completions.create(model=MODEL, messages=chat, max_tokens=2, stream=True,
                                                   stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_logit_bias_forces_a_token(client, smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    token = tok.encode(" banana")[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                  logit_bias={str(token): 100})
    assert r.choices[0].text == tok.decode([token] * 3)
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert plain.choices[0].text != r.choices[0].text
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                       logit_bias={str(tok.encode(plain.choices[0].text)[0]): -100})
    assert banned.choices[0].text != plain.choices[0].text


def test_chat_logprobs_shape_and_streaming(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=8,
                  logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert bytes(b for e in content for b in e.bytes).decode().startswith(r.choices[0].message.content)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_completion_logprobs_equal_hf(client, hf_smollm2):
    import torch

    model, tok = hf_smollm2
    prompt = tok.encode("The largest planet in the solar system is")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    ids = list(prompt)
    with torch.no_grad():
        for pos in range(6):  # HF's greedy continuation and its log-softmax
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
            top = ref.topk(2)
            assert lp.token_logprobs[pos] == pytest.approx(float(top.values[0]), abs=2e-3)
            assert lp.tokens[pos] == tok.decode([int(top.indices[0])])
            assert sorted(lp.top_logprobs[pos].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=2e-3)
            ids.append(int(top.indices[0]))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_echo(client):
    r = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("Roses are red,") and len(r.choices[0].text) > len("Roses are red,")
    plain = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=4, temperature=0)
    assert r.choices[0].text == "Roses are red," + plain.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Roses are red,", max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == r.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[[49, 50, 51]], max_tokens=2, temperature=0, echo=True)
    assert ids.choices[0].text.startswith("ABC")


def test_echo_with_logprobs_covers_the_prompt_then_the_completion(client, hf_smollm2):
    import torch

    model, tok = hf_smollm2
    prompt = "Roses are red, violets are"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    r = client.completions.create(**kwargs, echo=True)
    choice, lp = r.choices[0], r.choices[0].logprobs
    ids = tok.encode(prompt)
    assert "".join(lp.tokens) == choice.text and choice.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) + 4 and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(float(ref[p - 1, ids[p]]), abs=2e-3)
        assert sorted(lp.top_logprobs[p].values(), reverse=True) == pytest.approx(ref[p - 1].topk(2).values.tolist(),
                                                                                 abs=2e-3)
    plain = client.completions.create(**kwargs).choices[0].logprobs  # the completion's part, unchanged
    assert lp.tokens[len(ids):] == plain.tokens and lp.token_logprobs[len(ids):] == pytest.approx(plain.token_logprobs)
    chunks = list(client.completions.create(**kwargs, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    streamed = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.text_offset and chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_prompt_logprobs_in_vllms_shape(api, hf_smollm2):
    import torch

    model, tok = hf_smollm2
    r = api.post("/v1/completions", json={"model": MODEL, "prompt": "The sky is", "max_tokens": 2,
                                          "prompt_logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = tok.encode("The sky is")
    got = choice["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None and choice["logprobs"] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
    for p in range(1, len(ids)):
        entry = got[p][str(ids[p])]
        assert entry["logprob"] == pytest.approx(float(ref[p - 1, ids[p]]), abs=2e-3)
        assert entry["decoded_token"] == tok.decode([ids[p]]) and entry["rank"] >= 1
        top = ref[p - 1].topk(3)
        assert got[p][str(int(top.indices[0]))]["rank"] == 1
        assert len(got[p]) in (3, 4)  # the top 3, and the prompt token unless it is among them
    chat = api.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "prompt_logprobs": 0,
                                                  "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["prompt_logprobs"][0] is None and all(len(d) == 1 for d in chat["prompt_logprobs"][1:])
    assert "prompt_logprobs" not in api.post("/v1/completions", json={"model": MODEL, "prompt": "The sky is",
                                                                      "max_tokens": 2}).json()["choices"][0]


def test_n_choices_differ_under_sampling_and_match_under_greedy(client):
    msgs = [{"role": "user", "content": "Invent a name for a cat."}]
    sampled = client.chat.completions.create(model=MODEL, messages=msgs, n=3, temperature=1.0, seed=5, max_tokens=12)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.message.content for c in sampled.choices}) == 3
    greedy = client.chat.completions.create(model=MODEL, messages=msgs, n=3, temperature=0, max_tokens=12)
    assert len({c.message.content for c in greedy.choices}) == 1
    single = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens
    # streamed: chunks tagged by index add up to each choice
    texts = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, n=3, temperature=1.0, seed=5,
                                                max_tokens=12, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {c.index: c.message.content for c in sampled.choices}


def test_n_and_best_of_on_completions(client):
    r = client.completions.create(model=MODEL, prompt=["One, two,", "Red, green,"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    three = client.completions.create(model=MODEL, prompt="A recipe:", n=3, max_tokens=8, temperature=1.0, seed=9,
                                      logprobs=0)
    ranked = sorted(three.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = client.completions.create(model=MODEL, prompt="A recipe:", n=2, best_of=3, max_tokens=8, temperature=1.0,
                                     seed=9)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert all(c.logprobs is None for c in best.choices)  # ranked by logprobs, but none were asked for
    assert best.usage.prompt_tokens == three.usage.prompt_tokens


def _concurrently(fn, items):
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


def test_a_bad_schema_is_a_400_that_says_why_and_serving_goes_on(client, api):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    bad = [{**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
           {**chat, "structured_outputs": {"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}},
           {**chat, "guided_regex": "[a-"}]

    def post(body):
        return api.post("/v1/chat/completions", json=body)

    # the bad ones among good ones, at the same time: each bad one is refused, every good one served
    results = _concurrently(post, bad + [chat] * 3)
    messages = [r.json()["error"]["message"] for r in results[:3]]
    assert [r.status_code for r in results] == [400] * 3 + [200] * 3, messages
    assert messages[0].startswith("response_format: the JSON schema cannot be compiled") and "strin" in messages[0]
    assert messages[1].startswith("structured_outputs: the JSON schema cannot be compiled") and "nowhere" in messages[1]
    assert messages[2].startswith("guided_regex: the regex cannot be compiled")
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in results[3:])


def test_json_object_output_is_json(client, smollm2_dir):
    """Every reply that ends by itself parses as a JSON object; one cut by max_tokens is still a
    prefix of one (the mask never let a token out of the grammar)."""
    import xgrammar
    from transformers import AutoTokenizer

    json_grammar = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(
        AutoTokenizer.from_pretrained(smollm2_dir))).compile_builtin_json_grammar()
    topics = ["a cat", "the weather today", "a car", "a city in Europe", "a computer", "a tree"]

    def one(i):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Describe {topics[i]} in JSON."}], max_tokens=100,
            temperature=0.7, seed=i, response_format={"type": "json_object"})

    replies = [r.choices[0] for r in _concurrently(one, range(len(topics)))]
    assert sum(c.finish_reason == "stop" for c in replies) >= 2, replies  # (4 of 6 stop at these seeds)
    for c in replies:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict), c.message.content
        else:
            assert c.message.content.startswith("{") and xgrammar.GrammarMatcher(json_grammar).accept_string(
                c.message.content), c.message.content


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
        "office": {"type": "object", "properties": {"floor": {"type": "integer", "minimum": 0, "maximum": 40},
                                                    "desk": {"type": "string", "maxLength": 8}},
                   "required": ["floor", "desk"], "additionalProperties": False},
    },
    "required": ["name", "role", "skills", "office"], "additionalProperties": False,
}


def test_json_schema_output_validates_and_vllm_guided_fields(client):
    import jsonschema

    def one(i):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Make up employee number {i}."}], max_tokens=200,
            temperature=1.0, seed=i, response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                                               "schema": PERSON}})

    for r in _concurrently(one, range(6)):
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.completions.create(model=MODEL, prompt="Employee record:", max_tokens=200, temperature=0,
                                  extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.completions.create(model=MODEL, prompt="Is the sky blue?", max_tokens=5, n=4, temperature=1.0,
                                  seed=3, extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(model=MODEL, prompt="A date:", max_tokens=12, temperature=1.0, seed=1,
                                  extra_body={"guided_regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch("20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}],
                                       max_tokens=8, temperature=1.0, seed=2, n=3,
                                       extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert {c.message.content for c in r.choices} <= {"red", "green", "blue"}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add two numbers."}],
                                       max_tokens=16, temperature=1.0, seed=4, extra_body={
                                           "structured_outputs": {"grammar": 'root ::= num " + " num\nnum ::= [1-9] [0-9]?'}})
    assert re.fullmatch(r"[1-9][0-9]? \+ [1-9][0-9]?", r.choices[0].message.content), r.choices[0].message.content
    r = client.completions.create(model=MODEL, prompt="Employee record:", max_tokens=200, temperature=0.5, seed=5,
                                  extra_body={"structured_outputs": {"json": json.dumps(PERSON)}})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Make up an employee."}], max_tokens=200, temperature=0,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}))
    jsonschema.validate(json.loads(streamed), PERSON)


def test_inputs_found_by_review_are_400s_not_500s(api):
    """Each of these once reached a 500 or (the last) started millions of sequences."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("/v1/chat/completions", {**chat, "guided_grammar": "root ::= root"}, "allows no output"),
        ("/v1/chat/completions", {**chat, "guided_json": "[" * 50000}, "must be a JSON schema"),
        ("/v1/completions", {"model": MODEL, "prompt": [-1], "echo": True, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [[1, 2, 3]] * 20000, "n": 128, "best_of": 128, "max_tokens": 1},
         "one request may start at most"),
    ]
    for path, body, says in cases:
        r = api.post(path, json=body)
        assert r.status_code == 400, (body if len(str(body)) < 200 else path, r.text[:300])
        assert says in r.json()["error"]["message"], r.text[:300]
    assert api.post("/v1/chat/completions", json=chat).status_code == 200  # and serving goes on
