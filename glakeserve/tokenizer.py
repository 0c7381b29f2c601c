"""The tokenizer (HF's, loaded from the model directory) and incremental detokenization."""

from __future__ import annotations

import functools
from pathlib import Path

REPLACEMENT = "\ufffd"  # what a decoder emits for bytes of an unfinished UTF-8 character


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: printable Latin-1 bytes stand
    for themselves, the others take the code points from 256 on, in byte order. Char -> byte."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {chr(b): b for b in keep}
    for i, b in enumerate(b for b in range(256) if b not in set(keep)):
        out[chr(256 + i)] = b
    return out


BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))
        backend = getattr(self.hf, "backend_tokenizer", None)
        self._byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (as OpenAI's logprobs show it)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> list[int]:
        """One token's UTF-8 bytes: exact for byte-level BPE vocabularies (a token may hold part of
        a character), else the bytes of its text."""
        if self._byte_level:
            piece = self.hf.convert_ids_to_tokens(token_id)
            if piece is not None and all(c in BYTE_OF_CHAR for c in piece):
                return [BYTE_OF_CHAR[c] for c in piece]
        return list(self.token_text(token_id).encode("utf-8"))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """tools: OpenAI's [{"type": "function", "function": {...}}], rendered by the template (check
        tool_format first: a template without tool support ignores them)."""
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")
        return self.hf.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        # the template writes the special tokens itself
        return self.encode(self.chat_prompt(messages, tools=tools), add_special_tokens=False)

    @functools.cached_property
    def tool_format(self) -> str | None:
        """How this model writes tool calls, read from its chat template: "hermes" (<tool_call> blocks,
        Hermes and Qwen) or "llama3_json" (a bare JSON object, Llama 3.1); None when the template does
        not render tools (a prompt with a probe tool comes out the same as without it)."""
        if not self.has_chat_template:
            return None
        messages = [{"role": "user", "content": "hi"}]
        probe = [{"type": "function", "function": {"name": "glake_probe_tool", "description": "a probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            with_tools = self.chat_prompt(messages, tools=probe)
        except Exception:  # noqa: BLE001 -- a template that fails on tools (jinja errors of any kind) has no support
            return None
        if with_tools == self.chat_prompt(messages) or "glake_probe_tool" not in with_tools:
            return None
        template = self.hf.chat_template
        text = " ".join(template.values()) if isinstance(template, dict) else str(template)
        return "hermes" if "<tool_call>" in text else "llama3_json"


def detokenize_step(tok: Tokenizer, ids: list[int], prefix_offset: int, read_offset: int,
                    skip_special_tokens: bool = True) -> tuple[str, int, int]:
    """Text that token ids[read_offset:] add, right for characters spread over several tokens.

    Decodes a short window before the new tokens (from prefix_offset) so that tokenizers which
    merge spaces or bytes across tokens see their context; when the window ends inside a UTF-8
    character, emits nothing until the character is complete. Returns (new text, prefix_offset,
    read_offset) to pass on the next call."""
    prefix = tok.decode(ids[prefix_offset:read_offset], skip_special_tokens)
    full = tok.decode(ids[prefix_offset:], skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
        return full[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset
