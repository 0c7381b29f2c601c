"""Prompts -> token ids, off the event loop and bounded.

Chat templates and tokenizers run on one worker thread, so /health and other clients keep being
served while a long prompt is tokenized. Two bounds keep a huge prompt from costing much:
- a prompt that cannot fit max_model_len is refused after tokenizing at most its head
  (8 characters a token for max_model_len tokens; text averages about 4), or without tokenizing
  at all when it is longer than any max_model_len tokens can be (each token covers at most as many
  characters as the longest entry of the vocabulary; twice that, for normalizers that shorten text);
- the characters waiting for the tokenizer, all requests together, are limited: a request that
  would go beyond gets a 429 (retry later). One request alone is always admitted (the body-size
  limit bounds it).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import jinja2

from glakeserve.engine import LLMEngine
from glakeserve.sampling import SamplingParams
from glakeserve.server.protocol import ApiError

CHARS_PER_TOKEN_HEAD = 8  # characters a token, for the head that decides "too long" early
HEAD_MARGIN = 16  # tokens: a head cut mid-word may tokenize a little differently from the whole


class PromptEncoder:
    def __init__(self, engine: LLMEngine, max_queued_chars: int):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_len = engine.max_model_len
        self.max_queued_chars = max_queued_chars
        self.queued_chars = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glake-tokenize")
        longest = max((len(t) for t in self.tokenizer.hf.get_vocab()), default=1) if self.tokenizer else 1
        self.max_chars = 2 * longest * self.max_len  # no prompt longer than this can fit max_model_len

    async def encode(self, prompt: str | list[int] | list[dict], params: SamplingParams,
                     param: str, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a completion prompt (text or ids) or of chat messages (and the tools their
        template renders), validated against the engine (a 400 that says what is wrong), or a 429
        while the tokenizer is too busy."""
        chars = _chars(prompt) + (len(json.dumps(tools)) if tools else 0)
        if self.queued_chars and self.queued_chars + chars > self.max_queued_chars:
            raise ApiError(429, f"the server is busy: prompts of {self.queued_chars} characters are waiting for the "
                                f"tokenizer (the limit is {self.max_queued_chars}); retry later", param=param)
        self.queued_chars += chars
        loop = asyncio.get_running_loop()
        job = self._pool.submit(self._encode, prompt, params, tools)

        def release(_):
            try:
                loop.call_soon_threadsafe(self._release, chars)
            except RuntimeError:  # the event loop has closed: the server is gone
                pass

        job.add_done_callback(release)
        try:
            return await asyncio.wrap_future(job)
        except ValueError as e:
            raise ApiError(400, str(e), param=param) from None
        except TypeError as e:  # the tokenizer refuses text it cannot encode (a lone surrogate in a tool schema)
            raise ApiError(400, f"the prompt cannot be tokenized: {e} (check the strings in messages and tools "
                                f"for invalid Unicode)", param=param) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _release(self, chars: int) -> None:
        self.queued_chars -= chars

    # ----- on the tokenizer thread ------------------------------------------------------------
    def _encode(self, prompt, params: SamplingParams, tools: list[dict] | None) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            if self.tokenizer is None or not self.tokenizer.has_chat_template:
                raise ValueError("this model has no chat template; use /v1/completions")
            try:
                text = self.tokenizer.chat_prompt(prompt, tools=tools)
            except jinja2.TemplateError as e:  # a template that refuses these messages (raise_exception)
                raise ValueError(f"the model's chat template refused these messages: {e}") from None
            ids = self._bounded(text, lambda t: self.tokenizer.encode(t, add_special_tokens=False))
        elif isinstance(prompt, str):
            ids = self._bounded(prompt, lambda t: self.engine.encode_prompt(t)[1])
        else:
            ids = prompt
        return self.engine.validate_request(ids, params)[1]

    def _bounded(self, text: str, encode) -> list[int]:
        """encode(text), unless the text surely cannot fit max_model_len tokens."""
        if len(text) > self.max_chars:
            raise ValueError(self._too_long(f"it has {len(text)} characters, more than {self.max_len} tokens can "
                                            f"hold with this tokenizer"))
        head = CHARS_PER_TOKEN_HEAD * self.max_len
        if len(text) > head:
            n = len(encode(text[:head]))
            if n >= self.max_len + HEAD_MARGIN:
                raise ValueError(self._too_long(f"its first {head} characters alone are {n} tokens"))
        return encode(text)

    def _too_long(self, detail: str) -> str:
        return (f"the prompt is too long: {detail}, but max_model_len is {self.max_len}; shorten the prompt or "
                f"raise --max-model-len")


def _chars(prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return sum(len(m["content"]) + len(json.dumps(m.get("tool_calls", ""))) for m in prompt)
    return len(prompt)  # token ids
