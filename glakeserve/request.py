"""A request as the engine tracks it: a counter of computed tokens catching up with its tokens
(prompt + output) covers prefill, chunked prefill, recompute after preemption and decode alike.

With a step in flight the engine schedules the next one before reading the last one's tokens: a
token sampled on the device but not read yet is *pending*. It counts among the request's tokens
(the next step computes it, reading its id on the device) but its id is not known here yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from glakeserve.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """A token's logprob and the top-k tokens'. A sampled token's is processed (SamplingParams.logprobs
    = k); a prompt token's is raw, with its rank (SamplingParams.prompt_logprobs = k)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    rank: int | None = None  # prompt tokens: 1 + the tokens more likely than this one


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def tpot(self, num_output_tokens: int) -> float | None:
        if self.finished_time is None or self.first_token_time is None or num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (num_output_tokens - 1)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the params' seed, or one drawn for this request
    metrics: RequestMetrics
    max_tokens: int  # output limit after max_model_len is taken into account
    prompt: str | None = None
    stream: bool = False  # outputs every step, with incremental text; else one output at the end
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, if asked for
    # with SamplingParams.prompt_logprobs: one per prompt token read so far, None for the first
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])
    num_prompt_rows: int = 0  # prompt positions whose logprob row a launched step computes (p gives token p + 1's)
    num_computed_tokens: int = 0  # tokens whose KV is computed or being computed by a launched step
    num_pending: int = 0  # tokens sampled by launched steps whose ids have not been read yet
    status: RequestStatus = RequestStatus.WAITING
    slot: object | None = None  # kv.Slot while running
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None
    error: str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served at the first admission
    index: int = 0  # which of its request's n sequences this is
    share_prompt_of: Request | None = None  # sequence 0 of its request: admitted once that prompt is launched
    prompt_scheduled: int | None = None  # the schedule() call that scheduled the prompt's last token
    matcher: object | None = None  # with SamplingParams.guided: the grammar's state (structured.GrammarBackend)
    # incremental detokenization
    text: str = ""
    emitted: int = 0  # characters of text already returned as deltas
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def num_tokens(self) -> int:
        """Prompt, output and pending tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def cacheable_tokens(self) -> int:
        """Tokens admission may take from the prefix cache: all known ones but the last (computing it
        yields the next token's logits), and while prompt logprobs are owed none from the first prompt
        position whose row is still to be computed (its hidden state is needed)."""
        limit = len(self.prompt_token_ids) + len(self.output_token_ids) - 1
        if self.params.prompt_logprobs is not None and self.num_prompt_rows < len(self.prompt_token_ids) - 1:
            limit = min(limit, self.num_prompt_rows)
        return limit

    @property
    def num_scheduled_outputs(self) -> int:
        """Output tokens read or pending: what max_tokens and min_tokens count."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt and output tokens whose ids are known."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, n: int) -> list[int]:
        """Tokens [start, start + n) of prompt + output, without copying the whole sequence; -1 for a
        pending token (the device fills it in)."""
        p = len(self.prompt_token_ids)
        known = p + len(self.output_token_ids)
        if start + n <= p:
            return self.prompt_token_ids[start:start + n]
        ids = self.prompt_token_ids[start:p] + self.output_token_ids[max(0, start - p):start + n - p]
        return ids + [-1] * (start + n - max(start, known))

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What generate() returns per request; in streaming, one per step with the new text in delta."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    delta_text: str
    delta_token_ids: list[int]
    metrics: RequestMetrics
    num_preemptions: int = 0
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (not computed)
    index: int = 0  # which of its request's n sequences (SamplingParams.n) this output is
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when SamplingParams.logprobs is set
    delta_logprobs: list[TokenLogprob] | None = None  # of delta_token_ids
    # of prompt_token_ids (None for the first), when SamplingParams.prompt_logprobs is set: on every output
    # from the first (the step that computes the prompt's last tokens reads them with the first token)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
