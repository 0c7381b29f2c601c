"""LLM: the offline API users write against (vLLM's shape)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.request import RequestOutput
from glakeserve.sampling import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    """
    >>> llm = LLM()                                    # the embedded SmolLM2-135M-Instruct
    >>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _submit(self, prompts: Prompt | Sequence[Prompt], params, stream: bool = False) -> list[str]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
            plist = list(params)
        else:
            plist = [params or SamplingParams()] * len(prompts)
        # validate every prompt before queueing any, so a bad one changes nothing
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                self.engine.validate_request(p, sp)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = []
        for p, sp in zip(prompts, plist):
            for i in range(sp.n):  # n sequences: the first's prompt KV is shared by the others
                ids.append(self.engine.add_request(p, sp.for_sequence(i), stream=stream, index=i,
                                                   share_prompt_of=ids[-i] if i else None))
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params=None) -> list[RequestOutput]:
        """Runs prompts to completion; outputs in the order of the prompts, with SamplingParams.n
        > 1 the n sequences of a prompt one after the other (RequestOutput.index 0..n-1)."""
        ids = self._submit(prompts, sampling_params)
        final: dict[str, RequestOutput] = {}
        pending = set(ids)
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return [final[i] for i in ids]

    def generate_stream(self, prompts: Prompt | Sequence[Prompt], sampling_params=None) -> Iterator[RequestOutput]:
        """Yields a RequestOutput per request per step with its new text in `delta_text`. Closing
        the iterator early aborts what is left, freeing its memory at once."""
        ids = self._submit(prompts, sampling_params, stream=True)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort_request(rid)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        return self.generate([tok.chat_ids(c) for c in conversations], sampling_params)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.engine.abort_request(request_id)

    def close(self) -> None:
        self.engine.close()
