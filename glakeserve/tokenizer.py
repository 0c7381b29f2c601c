"""The tokenizer (HF's, loaded from the model directory) and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

REPLACEMENT = "\ufffd"  # what a decoder emits for bytes of an unfinished UTF-8 character


class Tokenizer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() with a plain prompt")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        # the template writes the special tokens itself
        return self.encode(self.chat_prompt(messages), add_special_tokens=False)


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
