"""OpenAI request bodies -> (prompt, SamplingParams), and our outputs -> OpenAI response bodies.

Every rejection is an ApiError with the status and message the client will see. Bodies are read
strictly: JSON without NaN/Infinity, only the fields this server knows, numbers in the range the
engine can hold, text that is valid Unicode; anything else is a 400 that names the field."""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib
import time
import uuid

from glakeserve.request import RequestOutput, TokenLogprob
from glakeserve.sampling import MAX_LOGPROBS, MAX_N, SamplingParams
from glakeserve.structured import GuidedDecoding

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlong, _short.maxlist, _short.maxdict = 3, 60, 60, 40, 5, 5


def short(value) -> str:
    """A bounded repr for error messages (a client's value may be huge or deeply nested)."""
    return _short.repr(value)


# ----- the body ---------------------------------------------------------------------------------
class _NotJson(ValueError):
    pass


def _reject_constant(name: str):
    raise _NotJson(name)


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to read") from None
    except _NotJson as e:
        raise ApiError(400, f"the request body is not valid JSON: {e} is not a JSON number (send a finite "
                            f"number)") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON: it is not UTF-8 text") from None
    except ValueError as e:  # an integer too long to convert
        raise ApiError(400, f"the request body has a number too large to read: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def check_text(text: str, where: str, param: str) -> str:
    """Text that goes to the tokenizer must be valid Unicode (JSON lets a lone surrogate through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where} contains a lone UTF-16 surrogate ({short(text[e.start])}) at character "
                            f"{e.start}: text must be valid Unicode", param=param) from None
    return text


# ----- fields -----------------------------------------------------------------------------------
# Accepted only at their "off" value (anything else is a 400 that says so).
UNSUPPORTED = {
    "functions": ("function calling is not supported", (None, [])),
    "function_call": ("function calling is not supported", (None, "none")),
    "suffix": ("suffix is not supported", (None, "")),
}

# What constrains the output (one at most): OpenAI's, then vLLM's
GUIDED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar")
STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")  # vLLM's, those honoured here

# OpenAI name -> accepted type (the vLLM extras among them pass straight to SamplingParams)
NUMERIC = {
    "temperature": float, "top_p": float, "presence_penalty": float, "frequency_penalty": float,
    "top_k": int, "min_p": float, "repetition_penalty": float, "min_tokens": int, "seed": int, "n": int,
}
BOOLEAN = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
COMMON = {"model", "stream", "stream_options", "max_tokens", "stop", "stop_token_ids", "user", "logit_bias", "best_of",
          *GUIDED_FIELDS,
          *NUMERIC, *BOOLEAN, *UNSUPPORTED}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                        "parallel_tool_calls", "prompt_logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "prompt_logprobs"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions (chat: top_logprobs up to 20)
INT64 = 2**63


def check_fields(body: dict, known: set[str], endpoint: str) -> None:
    for key in body:
        if key not in known:
            raise ApiError(400, f"{short(key)} is not an argument of {endpoint} that this server knows; remove it "
                                f"(the README's serve section lists the accepted ones)", param=key[:100])
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, f"user must be a string, got {short(body['user'])}", param="user")
    if body.get("parallel_tool_calls") is not None:
        if not isinstance(body["parallel_tool_calls"], bool):
            raise ApiError(400, "parallel_tool_calls must be true or false", param="parallel_tool_calls")
        if not body.get("tools"):
            raise ApiError(400, "parallel_tool_calls is only allowed when tools are given", param="parallel_tool_calls")


def _number(key: str, value, kind: type):
    what = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{key} must be {what}, got {short(value)}", param=key)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ApiError(400, f"{key} must be a finite number, got {value}", param=key)
        if kind is int:
            if not value.is_integer():
                raise ApiError(400, f"{key} must be an integer, got {value}", param=key)
            value = int(value)
    if not -INT64 <= value < INT64:
        raise ApiError(400, f"{key} is out of range: {short(value)} (it must fit in 64 bits)", param=key)
    return kind(value)


def logprobs_setting(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs from chat's logprobs (bool) + top_logprobs (0-20), or completions'
    logprobs (0-5)."""
    value = body.get("logprobs")
    if chat:
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, f"logprobs must be true or false, got {short(value)}", param="logprobs")
        top = body.get("top_logprobs")
        if top is None:
            return 0 if value else None
        if type(top) is not int or not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {short(top)}",
                           param="top_logprobs")
        if not value:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        return top
    if value is None or value is False:
        return None
    if type(value) is not int or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] for completions, got "
                            f"{short(value)}", param="logprobs")
    return value


def prompt_logprobs_setting(body: dict, logprobs: int | None, chat: bool) -> int | None:
    """SamplingParams.prompt_logprobs: vLLM's prompt_logprobs (0-20), else for completions with echo
    the logprobs setting (the echoed prompt's tokens carry logprobs too), as vLLM does."""
    value = body.get("prompt_logprobs")
    if value is None:
        return logprobs if not chat and body.get("echo") is True else None
    if type(value) is not int or not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, got {short(value)}",
                       param="prompt_logprobs")
    if body.get("stream"):
        raise ApiError(400, "prompt_logprobs are not available when stream=true (as in vLLM); drop one of them, "
                            "or use echo with logprobs on /v1/completions, whose first chunk carries the prompt's",
                       param="prompt_logprobs")
    return value


def best_of(body: dict, n: int, stream: bool) -> int:
    """Sequences to generate per prompt (n <= best_of <= 128); the n with the highest cumulative
    logprob are returned."""
    value = body.get("best_of")
    if value is None:
        return n
    if type(value) is not int or not n <= value <= MAX_N:
        raise ApiError(400, f"best_of must be an integer in [n, {MAX_N}] (n is {n}), got {short(value)}",
                       param="best_of")
    if stream and value > n:
        raise ApiError(400, "best_of greater than n cannot stream (the best are known only at the end)",
                       param="best_of")
    return value


def choose(outs: list[RequestOutput], params: SamplingParams, best_of: int
           ) -> tuple[list[list[RequestOutput]], list[RequestOutput]]:
    """outs: best_of sequences per prompt, prompt-major. Returns them grouped by prompt, and the
    choices: per prompt the n with the highest cumulative logprob (all of them when best_of == n),
    without logprobs the client did not ask for."""
    groups = [outs[i:i + best_of] for i in range(0, len(outs), best_of)]
    if best_of == params.n:
        return groups, outs
    chosen = []
    for group in groups:
        ranked = sorted(group, key=lambda o: -sum(lp.logprob for lp in o.logprobs or []))[:params.n]
        chosen += [o if params.logprobs is not None else dataclasses.replace(o, logprobs=None) for o in ranked]
    return groups, chosen


def request_usage(groups: list[list[RequestOutput]], choices: list[RequestOutput]) -> dict:
    """A prompt counts once however many sequences it has (its first sequence computed it; the others
    shared its pages): prompt and cached tokens of each prompt's first sequence, completion tokens of
    the choices returned."""
    return usage(sum(g[0].num_prompt_tokens for g in groups), sum(o.num_output_tokens for o in choices),
                 sum(g[0].num_cached_tokens for g in groups))


def guided_field(body: dict) -> str | None:
    """The field that constrains the output, if any (response_format of type text does not)."""
    given = [k for k in GUIDED_FIELDS if body.get(k) is not None
             and not (k == "response_format" and body[k] == {"type": "text"})]
    if len(given) > 1:
        raise ApiError(400, f"give at most one of {', '.join(GUIDED_FIELDS)}; got {', '.join(given)}", param=given[1])
    return given[0] if given else None


def guided_decoding(body: dict) -> GuidedDecoding | None:
    """OpenAI's response_format (text, json_object, json_schema), vLLM's structured_outputs (json,
    regex, choice, grammar, json_object) or its older guided_json, guided_regex, guided_choice,
    guided_grammar -> the constraint on the output (None: none)."""
    key = guided_field(body)
    if key is None:
        return None
    value = body[key]
    if key == "response_format":
        return _response_format(value)
    if key == "structured_outputs":
        if not isinstance(value, dict):
            raise ApiError(400, f"structured_outputs must be an object with one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}, "
                                f"got {short(value)}", param=key)
        unknown = [k for k in value if k not in STRUCTURED_OUTPUTS_KEYS and value[k] not in (None, False)]
        if unknown:
            raise ApiError(400, f"structured_outputs.{short(unknown[0])[1:-1]} is not supported by this server "
                                f"(it takes one of {', '.join(STRUCTURED_OUTPUTS_KEYS)})", param=key)
        given = [k for k in STRUCTURED_OUTPUTS_KEYS if value.get(k) not in (None, False)]
        if len(given) != 1:
            raise ApiError(400, f"structured_outputs must give exactly one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}, got "
                                f"{', '.join(given) or 'none'}", param=key)
        kind = given[0]
        if kind == "json_object":
            if value[kind] is not True:
                raise ApiError(400, f"structured_outputs.json_object must be true, got {short(value[kind])}", param=key)
            return GuidedDecoding("json_object")
        return _guided(kind, value[kind], f"structured_outputs.{kind}", key)
    return _guided(key.removeprefix("guided_"), value, key, key)


def _response_format(value) -> GuidedDecoding | None:
    key = "response_format"
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, f"response_format must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                            f"{{\"type\": \"json_schema\", \"json_schema\": {{\"name\": ..., \"schema\": {{...}}}}}}, got "
                            f"{short(value)}", param=key)
    extra = set(value) - {"type", "json_schema"}
    if extra or (value["type"] != "json_schema" and "json_schema" in value):
        raise ApiError(400, f"response_format has fields this server does not know: {short(sorted(extra or ['json_schema']))}",
                       param=key)
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return GuidedDecoding("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict) or set(spec) - {
            "name", "schema", "strict", "description"}:
        raise ApiError(400, "response_format.json_schema must be an object with a schema object (and optionally name, "
                            f"strict, description), got {short(spec)}", param=key)
    if not isinstance(spec.get("name", ""), str) or not isinstance(spec.get("description", ""), str) or \
            not isinstance(spec.get("strict", False), bool):
        raise ApiError(400, "response_format.json_schema: name and description must be strings, strict true or false",
                       param=key)
    return GuidedDecoding.json_schema(spec["schema"])


def _guided(kind: str, value, where: str, param: str) -> GuidedDecoding:
    """kind json (a schema object or its JSON text), regex, grammar (text) or choice (a list of
    strings), checked for shape; whether it compiles is checked by the engine."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise ApiError(400, f"{where} must be a JSON schema (an object, or its JSON text)", param=param) from None
        if not isinstance(value, dict):
            raise ApiError(400, f"{where} must be a JSON schema object, got {short(value)}", param=param)
        return GuidedDecoding.json_schema(value)
    if kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"{where} must be a non-empty string, got {short(value)}", param=param)
        return GuidedDecoding(kind, check_text(value, where, param))
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise ApiError(400, f"{where} must be a non-empty list of non-empty strings, got {short(value)}", param=param)
    return GuidedDecoding("choice", tuple(check_text(c, where, param) for c in value))


def echo_flag(body: dict) -> bool:
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ApiError(400, f"echo must be true or false, got {short(echo)}", param="echo")
    return bool(echo)


def sampling_params(body: dict, default_max_tokens: int | None, vocab_size: int, chat: bool = False,
                    forced: GuidedDecoding | None = None) -> SamplingParams:
    """forced: the constraint of a tool_choice that forces a call (the request may then have no other)."""
    for key, (why, off) in UNSUPPORTED.items():
        if key in body and not any(body[key] == v and type(body[key]) is type(v) for v in off):
            raise ApiError(400, f"{why} by this server (got {key}={short(body[key])})", param=key)
    guided = guided_decoding(body)
    if forced is not None and guided is not None:
        raise ApiError(400, f"tool_choice {short(body['tool_choice'])} forces a tool call, which cannot be combined "
                            f"with {guided_field(body)}", param="tool_choice")
    logprobs = logprobs_setting(body, chat)
    kwargs: dict = {"logprobs": logprobs, "prompt_logprobs": prompt_logprobs_setting(body, logprobs, chat),
                    "guided": forced or guided}
    for key, kind in NUMERIC.items():
        if body.get(key) is not None:
            kwargs[key] = _number(key, body[key], kind)
    for key in BOOLEAN:
        if body.get(key) is not None:
            if not isinstance(body[key], bool):
                raise ApiError(400, f"{key} must be true or false, got {short(body[key])}", param=key)
            kwargs[key] = body[key]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is not None:
        kwargs["max_tokens"] = _number(key, body[key], int)
    else:
        kwargs["max_tokens"] = default_max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, f"stop must be a string or a list of strings, got {short(stop)}", param="stop")
        for i, s in enumerate(stop):
            check_text(s, f"stop[{i}]", "stop")
        kwargs["stop"] = stop
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab_size for t in ids):
            raise ApiError(400, f"stop_token_ids must be a list of token ids in [0, {vocab_size}), got {short(ids)}",
                           param="stop_token_ids")
        kwargs["stop_token_ids"] = ids
    if body.get("logit_bias") is not None:
        kwargs["logit_bias"] = logit_bias(body["logit_bias"], vocab_size)
    if kwargs.get("top_k", 0) > vocab_size:
        raise ApiError(400, f"top_k must be at most the vocabulary size ({vocab_size}), got {kwargs['top_k']}; "
                            f"use 0 or -1 to turn top-k off", param="top_k")
    if "temperature" in kwargs and kwargs["temperature"] > 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {kwargs['temperature']}", param="temperature")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=param if param in kwargs else None) from None


def check_room(num_prompt_tokens: int, params: SamplingParams, body: dict, max_model_len: int) -> None:
    """The prompt and the asked-for output must fit the context together (as OpenAI and vLLM answer)."""
    if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > max_model_len:
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        asked = f"{key}={params.max_tokens}" if body.get(key) is not None else f"the default {key} of {params.max_tokens}"
        raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{num_prompt_tokens} tokens and {asked} asks for {params.max_tokens} more "
                            f"({num_prompt_tokens + params.max_tokens} in all); lower {key} or shorten the prompt",
                       param=key)


def logit_bias(value, vocab_size: int) -> dict[int, float]:
    """OpenAI's {"token id": bias} with biases in [-100, 100] -> {int: float}."""
    if not isinstance(value, dict):
        raise ApiError(400, f"logit_bias must be an object mapping token ids to biases, got {short(value)}",
                       param="logit_bias")
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) < 20 and int(key) < vocab_size):
            raise ApiError(400, f"logit_bias keys must be token ids in [0, {vocab_size}), got {short(key)}",
                           param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias values must be numbers in [-100, 100], got {short(bias)} for token "
                                f"{key}", param="logit_bias")
        out[int(key)] = float(bias)
    return out


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage), checked."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {short(stream)}", param="stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, f"stream_options must be an object like {{\"include_usage\": true}}, got "
                            f"{short(options)}", param="stream_options")
    usage_flag = options.get("include_usage", False)
    if not isinstance(usage_flag, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
    return True, usage_flag


def chat_messages(body: dict) -> list[dict]:
    """Messages as the chat template takes them: system (or developer), user, assistant (with
    tool_calls, whose arguments the template gets as objects) and tool (with tool_call_id)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user, assistant or tool",
                           param="messages")
        calls = m.get("tool_calls")
        if calls is not None and m["role"] != "assistant":
            raise ApiError(400, f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
        content = m.get("content")
        if content is None and calls:  # an assistant turn that only called tools
            content = ""
        if isinstance(content, list):  # content parts: text ones only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}]: only text content parts ({{\"type\": \"text\", \"text\": "
                                        f"...}}) are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        check_text(content, f"messages[{i}].content", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        message = {"role": role, "content": content}
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ApiError(400, f"messages[{i}]: a tool message needs the tool_call_id (a string) of the call it "
                                    f"answers, got {short(call_id)}", param="messages")
            message["tool_call_id"] = check_text(call_id, f"messages[{i}].tool_call_id", "messages")
            if m.get("name") is not None:
                if not isinstance(m["name"], str):
                    raise ApiError(400, f"messages[{i}].name must be a string", param="messages")
                message["name"] = m["name"]
        if calls:
            message["tool_calls"] = _message_tool_calls(calls, f"messages[{i}].tool_calls")
        out.append(message)
    return out


def _message_tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's [{id, type: function, function: {name, arguments: JSON text}}] with the
    arguments parsed (chat templates write them as objects)."""
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list, got {short(calls)}", param="messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function" or \
                not isinstance(call.get("id", ""), str) or not isinstance(function.get("name"), str) or \
                not isinstance(function.get("arguments"), str):
            raise ApiError(400, f"{where}[{j}] must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": "
                                f"..., \"arguments\": \"<JSON text>\"}}}}, got {short(call)}", param="messages")
        try:
            arguments = json.loads(function["arguments"])
        except (ValueError, RecursionError):
            arguments = None
        if not isinstance(arguments, dict):
            raise ApiError(400, f"{where}[{j}].function.arguments must be a JSON object as text, got "
                                f"{short(function['arguments'])}", param="messages")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def completion_prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    prompts = None
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        if all(type(t) is int for t in prompt):
            prompts = [prompt]
        elif all(isinstance(p, str) for p in prompt) or all(
                isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt):
            prompts = list(prompt)
    if prompts is None:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of lists of "
                            "token ids", param="prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_text(p, "prompt" if len(prompts) == 1 else f"prompt[{i}]", "prompt")
    return prompts


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(out: RequestOutput) -> str | None:
    """stop / length, or (for a request the server cut short) timeout / shutdown."""
    if not out.finished:
        return None
    return out.finish_reason if out.finish_reason in ("length", "timeout", "shutdown") else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """cached_tokens: prompt tokens the prefix cache served (their KV was not computed again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ----- logprobs in OpenAI's shapes -------------------------------------------------------------
LOGPROB_FLOOR = -9999.0  # what a token that cannot be sampled (-inf) shows: JSON has no infinity (vLLM's value)


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(entries: list[TokenLogprob] | None, tok) -> dict | None:
    """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]} (chat)."""
    if entries is None:
        return None

    def one(token_id: int, logprob: float) -> dict:
        return {"token": tok.token_text(token_id), "logprob": _finite(logprob), "bytes": tok.token_bytes(token_id)}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob | None] | None, tok, offset: int, ids: list[int] | None = None,
                        k: int | None = None) -> dict | None:
    """{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"} (completions);
    offset: characters of text before the first of these tokens. An entry may be None (an echoed
    prompt's first token: null logprob and top_logprobs), its token then given by ids (the entries'
    token ids); k: top tokens shown per entry (a prompt's entries may hold more)."""
    if entries is None:
        return None
    ids = ids if ids is not None else [e.token_id for e in entries]
    tokens = [tok.token_text(t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
            "top_logprobs": [None if e is None else {tok.token_text(t): _finite(lp) for t, lp in e.top[:k]}
                             for e in entries],
            "text_offset": offsets}


def echoed(out: RequestOutput, entries: list[TokenLogprob]) -> tuple[list[TokenLogprob | None], list[int]]:
    """An echoed choice's logprob entries, the prompt's (None for its first token) then `entries`, and
    their token ids (completion_logprobs' entries and ids)."""
    return out.prompt_logprobs + entries, out.prompt_token_ids + [e.token_id for e in entries]


def prompt_logprobs_json(entries: list[TokenLogprob | None] | None, tok) -> list | None:
    """vLLM's prompt_logprobs: null for the first token, then per token {token id: {"logprob", "rank",
    "decoded_token"}} for the prompt token and the top k (a top token's rank is its place)."""
    if entries is None:
        return None

    def one(token_id: int, logprob: float, rank: int) -> dict:
        text = tok.token_text(token_id) if tok is not None else None
        return {"logprob": _finite(logprob), "rank": rank, "decoded_token": text}

    out = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        d = {str(e.token_id): one(e.token_id, e.logprob, e.rank)}
        for place, (t, lp) in enumerate(e.top, 1):
            d.setdefault(str(t), one(t, lp, place))
        out.append(d)
    return out


def chat_message(out: RequestOutput, reply: tuple[str | None, list[dict]] | None) -> tuple[dict, str | None]:
    """(message, finish_reason) of a choice; reply: its (content, tool_calls) when tools were parsed
    (finish_reason "tool_calls" when there are calls and the model stopped by itself)."""
    reason = finish_reason(out)
    if reply is None or not reply[1]:
        return {"role": "assistant", "content": out.text if reply is None else reply[0], "refusal": None}, reason
    return ({"role": "assistant", "content": reply[0], "refusal": None, "tool_calls": reply[1]},
            "tool_calls" if reason == "stop" else reason)


def chat_response(rid: str, model: str, outs: list[RequestOutput], usage_: dict, tok=None,
                  replies: list | None = None) -> dict:
    """replies: per choice, (content, tool_calls) when the request's tools were parsed. Asked for,
    prompt_logprobs go beside the choices (vLLM's place: the choices share one prompt)."""
    choices = []
    for i, out in enumerate(outs):
        message, reason = chat_message(out, replies[i] if replies else None)
        choices.append({"index": i, "message": message, "logprobs": chat_logprobs(out.logprobs, tok),
                        "finish_reason": reason, "stop_reason": out.stop_reason})
    body = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}
    if outs and outs[0].prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs_json(outs[0].prompt_logprobs, tok)
    return body


@dataclasses.dataclass(frozen=True)
class StreamHead:
    """What every chunk of one stream repeats, as OpenAI's do: the id, one creation time, the model,
    system_fingerprint (null: we have none) and, with stream_options.include_usage, usage (null on
    every chunk but the last, which has no choices)."""

    id: str
    object: str  # chat.completion.chunk or text_completion
    model: str
    include_usage: bool
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def chunk(self, choices: list[dict]) -> dict:
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, usage_: dict) -> dict:
        return {**self.chunk([]), "usage": usage_}


FIRST_DELTA = {"role": "assistant", "content": "", "refusal": None}  # each chat choice's first chunk (OpenAI's)


def chat_chunk(head: StreamHead, delta: dict, reason: str | None, logprobs: dict | None = None, index: int = 0) -> dict:
    return head.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])


def completion_response(rid: str, model: str, outs: list[RequestOutput], texts: list[str], usage_: dict,
                        tok=None, echo: bool = False, k: int | None = None) -> dict:
    """texts: per choice, the prompt text put before its completion (echo=true), or "". With echo and
    logprobs (top k), a choice's logprobs cover its prompt's tokens, then its completion's. A choice
    whose request asked for prompt logprobs carries them too (vLLM's prompt_logprobs)."""
    choices = []
    for i, (o, text) in enumerate(zip(outs, texts)):
        if echo and o.logprobs is not None and o.prompt_logprobs is not None:
            entries, ids = echoed(o, o.logprobs)
            logprobs = completion_logprobs(entries, tok, 0, ids, k)
        else:
            logprobs = completion_logprobs(o.logprobs, tok, len(text))
        choice = {"index": i, "text": text + o.text, "logprobs": logprobs, "finish_reason": finish_reason(o),
                  "stop_reason": o.stop_reason}
        if o.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_json(o.prompt_logprobs, tok)
        choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}


def completion_chunk(head: StreamHead, index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
    return head.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}])
