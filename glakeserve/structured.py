"""Structured outputs: grammar-constrained decoding with xgrammar (the library vLLM and SGLang use).

A request's GuidedDecoding (a JSON schema, any JSON object, a regex, or a choice of strings) is
compiled once per distinct spec (xgrammar caches compiled grammars); each running request keeps a
matcher that the engine advances with every token it reads. Before a step samples, the runner asks
each constrained request's matcher for the tokens allowed next as a bitmask (32 tokens a word, bit j
of word w = token 32w + j), copies the masks to the device without waiting, and the sampler sets
the logits of every other token to -inf on the device (sampling.py). The mask of step N+1 needs the
token of step N, so with a constrained request sampling, the engine launches step N+1's forward,
reads step N while the device computes, advances the matchers, fills the masks, and only then
launches step N+1's sampling (penalties need no such split: their counts live on the device)."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

GUIDED_KINDS = ("json", "json_object", "regex", "choice", "grammar")
CACHED_GRAMMARS = 64  # compiled grammars kept (a JSON schema's takes from milliseconds to seconds to compile)


@dataclass(frozen=True)
class GuidedDecoding:
    """One constraint on a request's output: kind json (spec: a JSON schema as JSON text),
    json_object (any JSON object), regex (spec: the pattern), choice (spec: a tuple of strings) or
    grammar (spec: an EBNF grammar whose start rule is `root`)."""

    kind: str
    spec: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in GUIDED_KINDS:
            raise ValueError(f"guided decoding kind must be one of {', '.join(GUIDED_KINDS)}, got {self.kind!r}")
        if self.kind == "json_object":
            if self.spec is not None:
                raise ValueError("guided decoding json_object takes no spec")
        elif self.kind == "choice":
            if not isinstance(self.spec, tuple) or not self.spec or not all(isinstance(c, str) and c for c in self.spec):
                raise ValueError(f"guided choice must be a non-empty list of non-empty strings, got {self.spec!r}")
        elif not isinstance(self.spec, str) or not self.spec:
            raise ValueError(f"guided {self.kind} needs its spec as a non-empty string, got {self.spec!r}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> GuidedDecoding:
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema))


_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar prefixes its errors with a time and a C++ file


class GrammarBackend:
    """xgrammar over one tokenizer and vocabulary (the model's: ids past the tokenizer's are never
    allowed). stop_token_ids end a grammar: the matcher allows them once the output is complete."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of a row's bitmask
        self._compiling = threading.Lock()  # compiles come from the tokenizer thread and the engine thread
        self._cache: OrderedDict[GuidedDecoding, object] = OrderedDict()  # least recently used first
        self._cache_lock = threading.Lock()  # held only to look up or insert: never while compiling

    def compile(self, guided: GuidedDecoding):
        """The compiled grammar, or a ValueError that names what the library could not compile.
        A grammar compiled before (the server compiles off the engine thread) is found at once."""
        with self._cache_lock:
            if guided in self._cache:
                self._cache.move_to_end(guided)
                return self._cache[guided]
        with self._compiling:
            compiled = self._compile(guided)
        self._check_not_empty(guided, compiled)
        with self._cache_lock:
            self._cache[guided] = compiled
            if len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, guided: GuidedDecoding):
        try:
            if guided.kind == "json_object":  # any object (the builtin JSON grammar takes any value)
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         strict_mode=False)
            if guided.kind == "json":
                return self.compiler.compile_json_schema(guided.spec, any_whitespace=False)
            if guided.kind == "regex":
                return self.compiler.compile_regex(guided.spec)
            if guided.kind == "grammar":
                return self.compiler.compile_grammar(guided.spec)
            # a choice: an EBNF alternation of string literals (JSON escapes; characters past ASCII as they are)
            return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in guided.spec))
        except RuntimeError as e:
            what = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "EBNF grammar"}[guided.kind]
            raise ValueError(f"the {what} cannot be compiled: "
                             f"{_LOCATION.sub('', str(e)).strip()}") from None

    def _check_not_empty(self, guided: GuidedDecoding, compiled) -> None:
        """A grammar that allows no first token (`root ::= root`) compiles, but no output can follow
        it: refused here, before a request is sampled into a token its matcher rejects."""
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher = self.xgr.GrammarMatcher(compiled)
        matcher.fill_next_token_bitmask(mask)
        if not bool((mask != 0).any()):
            raise ValueError(f"the {guided.kind} constraint allows no output at all (no first token matches it)")

    def matcher(self, guided: GuidedDecoding):
        """A fresh matcher (xgrammar.GrammarMatcher): accept_token(id) -> bool, fill_next_token_bitmask,
        is_terminated()."""
        return self.xgr.GrammarMatcher(self.compile(guided))
