"""OpenAI request bodies -> (prompt, SamplingParams), and our outputs -> OpenAI response bodies.

Every rejection is an ApiError with the status and message the client will see."""

from __future__ import annotations

import time
import uuid

from glakeserve.request import RequestOutput
from glakeserve.sampling import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


UNSUPPORTED = {
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "best_of": "best_of is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
}

# OpenAI name -> (SamplingParams name, accepted types); vLLM's extras pass straight through
NUMERIC = {
    "temperature": float, "top_p": float, "presence_penalty": float, "frequency_penalty": float,
    "top_k": int, "min_p": float, "repetition_penalty": float, "min_tokens": int, "seed": int, "n": int,
}
BOOLEAN = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


def _number(body: dict, key: str, kind: type):
    value = body[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and ok and float(value) != int(value):
        ok = False
    if not ok:
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=key)
    return kind(value)


def sampling_params(body: dict, default_max_tokens: int | None) -> SamplingParams:
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, False, 0, [], ""):
            raise ApiError(400, f"{why} by this server", param=key)
    kwargs: dict = {}
    for key, kind in NUMERIC.items():
        if body.get(key) is not None:
            kwargs[key] = _number(body, key, kind)
    for key in BOOLEAN:
        if body.get(key) is not None:
            if not isinstance(body[key], bool):
                raise ApiError(400, f"{key} must be true or false, got {body[key]!r}", param=key)
            kwargs[key] = body[key]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        kwargs["max_tokens"] = _number({"max_tokens": max_tokens}, "max_tokens", int)
    else:
        kwargs["max_tokens"] = default_max_tokens
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, f"stop must be a string or a list of strings, got {stop!r}", param="stop")
        kwargs["stop"] = stop
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ApiError(400, "stop_token_ids must be a list of integers", param="stop_token_ids")
        kwargs["stop_token_ids"] = ids
    if "temperature" in kwargs and kwargs["temperature"] > 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {kwargs['temperature']}", param="temperature")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        param = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), param=param if param in kwargs else None) from None


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    raise ApiError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    return "length" if out.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, out: RequestOutput) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                     "finish_reason": finish_reason(out), "stop_reason": out.stop_reason}],
        "usage": usage(out.num_prompt_tokens, out.num_output_tokens),
    }


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}


def completion_response(rid: str, model: str, outs: list[RequestOutput]) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": o.text, "logprobs": None, "finish_reason": finish_reason(o),
                     "stop_reason": o.stop_reason} for i, o in enumerate(outs)],
        "usage": usage(sum(o.num_prompt_tokens for o in outs), sum(o.num_output_tokens for o in outs)),
    }


def completion_chunk(rid: str, model: str, index: int, text: str, reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}
