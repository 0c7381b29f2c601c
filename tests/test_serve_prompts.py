"""The server's prompt encoder (glakeserve/server/prompts.py) on its own: a prompt that cannot fit
is refused having tokenized at most its head, and prompts waiting for the tokenizer are bounded."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from glakeserve.sampling import SamplingParams
from glakeserve.server.prompts import CHARS_PER_TOKEN_HEAD, PromptEncoder
from glakeserve.server.protocol import ApiError
from glakeserve.tokenizer import Tokenizer


class Engine:
    """What PromptEncoder uses of LLMEngine; counts the characters it was asked to tokenize."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int):
        self.max_model_len, self.encoded_chars = max_model_len, 0

        def encode(text, add_special_tokens=True):
            self.encoded_chars += len(text)
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

        self.tokenizer = SimpleNamespace(encode=encode, hf=tokenizer.hf, chat_prompt=tokenizer.chat_prompt,
                                         has_chat_template=tokenizer.has_chat_template)

    def encode_prompt(self, prompt):
        return prompt, self.tokenizer.encode(prompt)

    def validate_request(self, ids, params):
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}")
        return None, ids


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer(smollm2_dir)


def test_a_long_prompt_is_refused_by_its_head(tokenizer):
    engine = Engine(tokenizer, max_model_len=256)
    encoder = PromptEncoder(engine, max_queued_chars=1 << 30)
    text = "the quick brown fox jumps " * 400  # 10,000 characters: over the head, under the hard bound
    assert CHARS_PER_TOKEN_HEAD * 256 < len(text) < encoder.max_chars
    with pytest.raises(ApiError, match="its first 2048 characters alone are"):
        asyncio.run(encoder.encode(text, SamplingParams(), "prompt"))
    assert engine.encoded_chars == CHARS_PER_TOKEN_HEAD * 256  # the head only
    ok = asyncio.run(encoder.encode("the quick brown fox", SamplingParams(), "prompt"))
    assert ok == tokenizer.hf.encode("the quick brown fox")
    messages = [{"role": "user", "content": "Hi!"}]
    assert asyncio.run(encoder.encode(messages, SamplingParams(), "messages")) == tokenizer.chat_ids(messages)
    encoder.close()


def test_characters_waiting_for_the_tokenizer_are_bounded(tokenizer):
    engine = Engine(tokenizer, max_model_len=4096)
    gate = threading.Event()
    encode = engine.tokenizer.encode

    def held_encode(text, add_special_tokens=True):
        gate.wait(10)  # the tokenizer thread is busy until the gate opens
        return encode(text, add_special_tokens)

    engine.tokenizer.encode = held_encode
    encoder = PromptEncoder(engine, max_queued_chars=1000)

    async def run():
        first = asyncio.ensure_future(encoder.encode("a " * 300, SamplingParams(), "prompt"))
        second = asyncio.ensure_future(encoder.encode("b " * 300, SamplingParams(), "prompt"))
        await asyncio.sleep(0.05)
        assert encoder.queued_chars == 600 and not first.done() and second.done()
        with pytest.raises(ApiError) as refused:
            second.result()
        assert refused.value.status == 429 and "retry later" in refused.value.message
        gate.set()
        await first
        await asyncio.sleep(0.05)
        assert encoder.queued_chars == 0
        assert await encoder.encode("c " * 300, SamplingParams(), "prompt")  # admitted again

    asyncio.run(run())
    encoder.close()
