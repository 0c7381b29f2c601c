"""Tool calling on /v1/chat/completions (issue 12): the parsers of both formats on fixed texts, the
template's tool support detected, and end to end through `glake serve` with the openai client on a
tiny random Llama whose tokenizer (SmolLM2's) carries a Hermes-style template that renders tools.
A random model calls no tool by itself: calls come from tool_choice forcing them, or from a guided
choice that makes the free ("auto") output a Hermes call."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import pytest
from openai import OpenAI

from glakeserve.server.protocol import ApiError
from glakeserve.server.tools import ToolStream, parse_tool_calls, tool_request
from glakeserve.tokenizer import Tokenizer
from helpers import save_tiny_hf_llama
from serve_helpers import InProcess, Server

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call these functions; to call one, reply <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA31_TEMPLATE = """\
{%- for message in messages %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{%- if loop.last and tools %}
Respond with a JSON object {"name": function name, "parameters": dictionary of argument name and its value}.
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}
{%- endif %}
{{ message.content }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "metric": {"type": "boolean"}},
           "required": ["city", "metric"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now"}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {"get_weather": WEATHER, "get_time": {"type": "object", "properties": {}}}


def with_template(src, dst, template: str):
    dst.mkdir(exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, dst / f)
    (dst / "chat_template.jinja").write_text(template)
    return dst


# ----- parsers on fixed texts --------------------------------------------------------------------
NAMES = ("get_weather", "get_time")


def calls(found):
    return None if found is None else (found[0], [(c.name, c.arguments) for c in found[1]])


def test_hermes_parser():
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert calls(parse_tool_calls(one, "hermes", NAMES)) == (None, [("get_weather", {"city": "Paris"})])
    two = 'Let me check.\n' + one + '\n<tool_call>{"name": "get_time", "parameters": {}}</tool_call>'
    assert calls(parse_tool_calls(two, "hermes", NAMES)) == (
        "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {})])
    unclosed = '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}'  # arguments as JSON text
    assert calls(parse_tool_calls(unclosed, "hermes", NAMES)) == (None, [("get_time", {"tz": "UTC"})])
    other = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    for text, content in [(one + "\nI asked for the weather.\n", "I asked for the weather."),  # after the last call
                          ("Checking.\n" + one + "\nThen the time:\n" + other + " Done.",
                           "Checking.\nThen the time:\n Done."),
                          ("  " + one + "\n" + other + "\n", None)]:
        assert parse_tool_calls(text, "hermes", NAMES)[0] == content, text
    for plain in ("The weather is fine.", '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
                  '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',  # not one of the tools
                  '<tool_call>["get_time"]</tool_call>', '<tool_call>{"name": ["get_time"], "arguments": {}}</tool_call>',
                  '<tool_call>{"name": "get_time", "arguments": 3}</tool_call>'):
        assert parse_tool_calls(plain, "hermes", NAMES) is None, plain


def test_llama3_json_parser():
    assert calls(parse_tool_calls(' {"name": "get_weather", "parameters": {"city": "Rome"}}', "llama3_json",
                                  NAMES)) == (None, [("get_weather", {"city": "Rome"})])
    text = '<|python_tag|>{"name": "get_time", "arguments": {}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert calls(parse_tool_calls(text, "llama3_json", NAMES)) == (
        None, [("get_time", {}), ("get_weather", {"city": "Oslo"})])
    for plain in ('Sure: {"name": "get_time", "parameters": {}}', '{"name": "get_time", "parameters": {}} done',
                  '{"name": "other", "parameters": {}}', '{"name": "get_time", "parameters": {', '{"city": "Paris"}'):
        assert parse_tool_calls(plain, "llama3_json", NAMES) is None, plain


def test_tool_request_parse_honours_choice_and_parallel():
    body = {"tools": TOOLS}
    two = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert len(tool_request(body).parse(two, "hermes")[1]) == 2
    assert len(tool_request({**body, "parallel_tool_calls": False}).parse(two, "hermes")[1]) == 1
    assert tool_request({**body, "tool_choice": "none"}).parse(two, "hermes") == (two, [])
    named = tool_request({**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert json.loads(named.forced().spec) == WEATHER
    assert calls(named.parse('{"city": "Oslo", "metric": false}', "hermes")) == (
        None, [("get_weather", {"city": "Oslo", "metric": False})])
    assert named.parse('{"city": "Os', "hermes") == ('{"city": "Os', [])  # cut short: content
    required = tool_request({**body, "tool_choice": "required"})
    assert json.loads(required.forced().spec)["type"] == "array"
    assert calls(required.parse('[{"name": "get_time", "parameters": {}}]', "llama3_json")) == (
        None, [("get_time", {})])
    assert required.parse("[]", "hermes") == ("[]", [])
    assert tool_request({"tools": [], "tool_choice": "none"}) is None


STREAMED = [  # (format, reply, content that may go out before the end)
    ("hermes", 'Let me see.\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Let me see."),
    ("hermes", 'Use a <tool> or <tool_call>{"name": "get_time", "arguments": {}}</tool_call>', "Use a <tool> or"),
    ("hermes", "No call here, only <tool_ text.", "No call here, only <tool_ text."),
    ("hermes", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', ""),
    ("hermes", 'Now.\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nAsked.', "Now."),
    ("llama3_json", '  {"name": "get_time", "parameters": {}}', ""),
    ("llama3_json", "Plain {text}", "Plain {text}"),
    ("llama3_json", '<|python_tag|>{"name": "get_time", "parameters": {}}', ""),
]


@pytest.mark.parametrize("fmt,reply,early", STREAMED)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_reply_matches_the_whole_one(fmt, reply, early, step):
    """Fed in pieces, a reply gives the content that parse() gives for it whole, and the same calls;
    nothing that can belong to a call goes out before the end."""
    tools = tool_request({"tools": TOOLS})
    reader = ToolStream(tools, fmt)
    sent = "".join(reader.feed(reply[i:i + step]) for i in range(0, len(reply), step))
    assert early.startswith(sent) and (step == 1000 or sent == early), sent
    rest, found = reader.finish()
    content, whole = tools.parse(reply, fmt)
    assert sent + rest == (content or "") and [c.name for c in found] == [c.name for c in whole]


DEEP = {"type": "object"}
for _ in range(2000):
    DEEP = {"type": "object", "properties": {"a": DEEP}}
BAD_TOOLS = [  # (fields, words the message must hold)
    ({"tools": {"name": "f"}}, "tools must be a list"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]},
     "tools[0].function.parameters.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": 3}}}}}]}, "parameters.properties.x.type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}, "type object"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}}]}, "required"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "minLength": -1}}}}}]}, "parameters.properties.x.minLength: -1 is less than"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]}, "nested too deeply"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "extra"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "more than once"),
]
BAD_CHOICES = [
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice must be"),
    ({"tool_choice": "required"}, "needs tools"),
]


@pytest.mark.parametrize("fields,words", BAD_TOOLS + BAD_CHOICES)
def test_bad_tool_fields_are_refused_by_name(fields, words):
    with pytest.raises(ApiError) as e:
        tool_request(fields)
    assert e.value.status == 400 and words in e.value.message
    assert e.value.param == ("tools" if (fields, words) in BAD_TOOLS else "tool_choice")


def test_tool_support_is_read_from_the_template(smollm2_dir, tmp_path):
    assert Tokenizer(smollm2_dir).tool_format is None  # SmolLM2's template ignores tools
    assert Tokenizer(with_template(smollm2_dir, tmp_path / "h", HERMES_TEMPLATE)).tool_format == "hermes"
    llama = Tokenizer(with_template(smollm2_dir, tmp_path / "l", LLAMA31_TEMPLATE))
    assert llama.tool_format == "llama3_json"
    assert "get_weather" in llama.chat_prompt(MESSAGES, tools=TOOLS)


# ----- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hermes_model(tmp_path_factory, smollm2_dir):
    path = save_tiny_hf_llama(tmp_path_factory.mktemp("tools-model"), vocab=49152, hidden=64, layers=2)
    return with_template(smollm2_dir, path, HERMES_TEMPLATE)


@pytest.fixture(scope="module")
def server(tmp_path_factory, hermes_model):
    s = Server(["--model", str(hermes_model), "--max-model-len", "512", "--max-num-seqs", "8", "--kv-cache-memory",
                "32MiB", "--served-model-name", "tiny-tools"], tmp_path_factory.mktemp("serve") / "server.log")
    s.wait_ready()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def in_process(hermes_model):
    s = InProcess(hermes_model, max_model_len=512, max_num_seqs=8, kv_cache_memory=32 << 20)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def check_call(call, name: str):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[name])
    return arguments


def test_named_tool_choice_returns_a_valid_call(client):
    for name in ("get_weather", "get_time"):
        r = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": name}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0], name)


def test_required_tool_choice_returns_valid_calls(client):
    r = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                       tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=3, n=3)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        (call,) = choice.message.tool_calls
        check_call(call, call.function.name)
    close = {"77": 100, "31845": 100}  # "]" and "}]" in SmolLM2's vocabulary: the random model ends the list
    r = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=120,
                                       tool_choice="required", logit_bias=close)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    for call in r.choices[0].message.tool_calls:  # one or more: parallel calls are allowed
        check_call(call, call.function.name)


def test_auto_parses_a_hermes_call_and_leaves_other_text_as_content(client):
    said = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "metric": true}}</tool_call>'
    r = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                       extra_body={"guided_choice": [said]})
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert check_call(message.tool_calls[0], "get_weather") == {"city": "Rome", "metric": True}
    unknown = '<tool_call>{"name": "launch", "arguments": {}}</tool_call>'
    r = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                       extra_body={"guided_choice": [unknown]})
    assert r.choices[0].message.content == unknown and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                       tool_choice="none", extra_body={"guided_choice": [said]})
    assert r.choices[0].message.content == said and not r.choices[0].message.tool_calls


def test_streamed_tool_call_comes_in_one_delta(client):
    stream = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    with_calls = [d for d in deltas if d.delta.tool_calls]
    assert len(with_calls) == 1 and with_calls[0].finish_reason == "tool_calls"
    (call,) = with_calls[0].delta.tool_calls
    assert call.index == 0
    check_call(call, "get_weather")
    assert chunks[-1].usage.completion_tokens > 0


def test_text_after_the_last_hermes_call_is_content(client):
    said = ('Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "metric": true}}</tool_call>'
            '\nI asked for the weather in Rome.')
    ask = dict(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=80, extra_body={"guided_choice": [said]})
    message = client.chat.completions.create(**ask).choices[0].message
    assert message.content == "Checking.\nI asked for the weather in Rome." and len(message.tool_calls) == 1
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**ask, stream=True)]
    assert "".join(d.content or "" for d in deltas) == message.content
    assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["get_weather"]


def test_streamed_auto_reply_sends_content_first_then_the_call(client):
    said = 'Checking now.<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "metric": false}}</tool_call>'
    chunks = list(client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                                 stream=True, extra_body={"guided_choice": [said]}))
    deltas = [c.choices[0] for c in chunks]
    content = [d.delta.content for d in deltas if d.delta.content]
    assert "".join(content) == "Checking now." and len(content) > 1  # streamed, not held back
    with_calls = [d for d in deltas if d.delta.tool_calls]
    assert len(with_calls) == 1 and with_calls[-1] is deltas[-1] and deltas[-1].finish_reason == "tool_calls"
    assert check_call(with_calls[0].delta.tool_calls[0], "get_weather") == {"city": "Oslo", "metric": False}
    plain = dict(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**plain).choices[0]
    pieces = [c.choices[0] for c in client.chat.completions.create(**plain, stream=True)]
    assert "".join(p.delta.content or "" for p in pieces) == whole.message.content
    assert pieces[-1].finish_reason == whole.finish_reason != "tool_calls"


def test_a_llama_template_gets_its_calls_parsed_as_json(tmp_path, smollm2_dir):
    """The parser follows the template: behind a Llama 3.1-style template a bare JSON object is a
    call (and a Hermes block is not)."""
    path = save_tiny_hf_llama(tmp_path / "llama-tools", vocab=49152, hidden=64, layers=2)
    with_template(smollm2_dir, path, LLAMA31_TEMPLATE)
    s = Server(["--model", str(path), "--max-model-len", "256", "--kv-cache-memory", "16MiB",
                "--served-model-name", "tiny-llama"],
               tmp_path / "server.log").wait_ready()
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        said = '{"name": "get_weather", "parameters": {"city": "Paris", "metric": true}}'
        r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                           extra_body={"guided_choice": [said]})
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert check_call(r.choices[0].message.tool_calls[0], "get_weather") == {"city": "Paris", "metric": True}
        hermes = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
        r = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, tools=TOOLS, max_tokens=60,
                                           extra_body={"guided_choice": [hermes]})
        assert r.choices[0].message.content == hermes and not r.choices[0].message.tool_calls
    finally:
        assert s.stop() == 0, s.log()


def test_tool_results_in_the_conversation_are_rendered(client, server):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "metric": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    r = client.chat.completions.create(model="tiny-tools", messages=history, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    shorter = client.chat.completions.create(model="tiny-tools", messages=MESSAGES, tools=TOOLS, max_tokens=1)
    assert r.usage.prompt_tokens > shorter.usage.prompt_tokens + 20  # the call and its result are in the prompt
    bad = [  # (message, what the 400 says)
        ({"role": "tool", "content": "21"}, "tool_call_id"),
        ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                "function": {"name": "get_time", "arguments": "{oops"}}]}, "arguments"),
        ({"role": "user", "content": "x", "tool_calls": []}, "only assistant"),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as api:
        for message, words in bad:
            e = api.post("/v1/chat/completions", json={"messages": MESSAGES + [message], "max_tokens": 1}).json()
            assert words in e["error"]["message"] and e["error"]["param"] == "messages", e
        e = api.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
                                                   "response_format": {"type": "json_object"}}).json()
        assert e["error"]["param"] == "tool_choice" and "response_format" in e["error"]["message"], e
        unsupported = {"type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}
        e = api.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": unsupported}}]}).json()
        assert e["error"]["param"] == "tools" and "tools[0].function.parameters" in e["error"]["message"], e


def test_only_a_forced_call_compiles_a_grammar(in_process, monkeypatch):
    """Under tool_choice auto or none the tools' schemas are checked against the meta-schema, never
    compiled (each tool set would churn the engine's grammar cache); a forced call compiles the one
    grammar the engine uses, and a schema it cannot compile is a 400 naming the tool."""
    engine, compiled = in_process.llm.engine, []
    compile_guided = engine.compile_guided
    monkeypatch.setattr(engine, "compile_guided", lambda guided: compiled.append(guided) or compile_guided(guided))
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {f"x{i}": {"type": "integer"}}, "required": [f"x{i}"]}}} for i in range(8)]
    chat = {"messages": MESSAGES, "tools": tools, "max_tokens": 2}
    plain = [chat, {**chat, "tool_choice": "auto"}, {**chat, "tool_choice": "none", "stream": True}]
    assert [r.status_code for r in in_process.post(*[("/v1/chat/completions", b) for b in plain])] == [200] * 3
    assert compiled == []
    regex = {"type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}  # not a regex
    unresolved = {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}  # valid, but no grammar
    bad = [{**chat, "tools": tools + [{"type": "function", "function": {"name": "f", "parameters": regex}}]},
           {**chat, "tools": tools + [{"type": "function", "function": {"name": "f", "parameters": unresolved}}],
            "tool_choice": "required"},
           {**chat, "tools": [{"type": "function", "function": {"name": "f", "parameters": unresolved}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}]
    errors = [r.json()["error"] for r in in_process.post(*[("/v1/chat/completions", b) for b in bad])]
    assert errors[0]["message"].startswith("tools[8].function.parameters.properties.x.pattern: '(' is not a 'regex'")
    assert [e["message"].split(":")[0] for e in errors[1:]] == ["tools[8].function.parameters",
                                                                 "tools[0].function.parameters"], errors
    assert all(e["param"] == "tools" for e in errors) and "nowhere" in errors[1]["message"], errors
    compiled.clear()
    forced = [{**chat, "tool_choice": "required"}, {**chat, "tool_choice": {"type": "function",
                                                                           "function": {"name": "tool_3"}}}]
    assert [r.status_code for r in in_process.post(*[("/v1/chat/completions", b) for b in forced])] == [200] * 2
    assert set(compiled) == {tool_request(b).forced() for b in forced}  # checked, then found by the engine


def test_meta_check_follows_the_schema_draft_and_ecma_patterns(in_process):
    """Under tool_choice auto a tool schema is checked against the meta-schema of the draft its
    `$schema` names (2020-12 by default), and a pattern as an ECMA-262 regex: valid schemas of older
    drafts and ECMA-only pattern syntax pass, broken ones are a 400 naming the place."""
    valid = [
        {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
         "properties": {"n": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}},  # draft-04's boolean form
        {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"s": {"type": "string"}},
         "type": "object", "properties": {"x": {"$ref": "#/definitions/s"}}},
        {"type": "object", "properties": {"d": {"type": "string", "pattern": r"^(?<year>\d{4})-(?<month>\d{2})$"},
                                          "w": {"type": "string", "pattern": r"^\p{L}+$"},
                                          "e": {"type": "string", "format": "email"}}},
    ]
    invalid = [
        ({"type": "object", "properties": {"n": {"type": "number", "exclusiveMinimum": True}}},
         "properties.n.exclusiveMinimum"),  # boolean only up to draft-04
        ({"$schema": "http://json-schema.org/draft-04/schema#", "type": "object", "properties": {"x": {"type": 5}}},
         "properties.x.type"),
        ({"type": "object", "properties": {"x": {"type": "string", "pattern": r"(?<year\d)"}}}, "properties.x.pattern"),
    ]
    chat = {"messages": MESSAGES, "max_tokens": 2, "tool_choice": "auto"}
    bodies = [{**chat, "tools": [{"type": "function", "function": {"name": "f", "parameters": p}}]}
              for p in valid + [p for p, _ in invalid]]
    replies = in_process.post(*[("/v1/chat/completions", b) for b in bodies])
    assert [r.status_code for r in replies] == [200] * len(valid) + [400] * len(invalid), [r.text for r in replies]
    for r, (_, place) in zip(replies[len(valid):], invalid):
        error = r.json()["error"]
        assert error["param"] == "tools" and error["message"].startswith(f"tools[0].function.parameters.{place}"), error
