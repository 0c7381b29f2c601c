"""Continuous batching: FCFS admission, chunked prefill under a token budget, preemption by
recompute. Requests are counters: each step gives a request min(tokens it lacks, budget left) new
tokens to compute; prefill, chunked prefill and decode are the same rule. The scheduler owns the KV
cache (which slot, which blocks) and advances its own counters: schedule() counts the step's tokens
as computed, update() takes the tokens the step sampled."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from glakeserve.kv import KVCache
from glakeserve.request import Request, RequestStatus

UPCOMING = 64  # waiting requests the cache may prepare slots for, at most
FINISHING = 8  # seats expected to free up by the next step beyond the empty ones


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # first position each request computes
    samplers: list[Request] = field(default_factory=list)  # requests whose next token this step samples
    sample_steps: list[int] = field(default_factory=list)  # output tokens each sampler had before this one
    # (index in requests, first, stop): prompt positions [first, stop) whose logprob rows this step computes
    prompt_rows: list[tuple[int, int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # can never fit: finished with an error
    upcoming: list[Request] = field(default_factory=list)  # waiting requests likely admitted soon

    @property
    def empty(self) -> bool:
        return not self.requests

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, kv: KVCache, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: tuple[int, ...] = ()):
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_schedules = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        self.num_schedules += 1
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. running requests, oldest first; the newest are preempted when memory runs out
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0 or req.num_scheduled_outputs >= req.max_tokens:  # its last token is still being read
                i += 1
                continue
            while not self.kv.reserve(req, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                self._add(batch, req, n)
                budget -= n
                i += 1
        # 2. waiting requests, first come first served, unless memory was short this step
        while not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:  # preempted with a token in flight: admitted once it is read
                break
            if not self._prompt_shared(req):
                break
            if not self.kv.admit(req):
                break
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.reserve(req, req.num_computed_tokens + n):
                self.kv.release(req)
                req.num_computed_tokens = 0
                if not self.running:  # alone and still no room: it can never run
                    self.waiting.popleft()
                    self._finish(req, "abort", error="the KV cache cannot hold this request; raise kv_cache_memory")
                    batch.failed.append(req)
                    continue
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = req.num_computed_tokens  # what admission found in the prefix cache
            req.share_prompt_of = None
            self.running.append(req)
            self._add(batch, req, n)
            budget -= n
        # the next admissions, so the cache can map their blocks while this step runs
        seats = min(UPCOMING, max(0, self.max_num_seqs - len(self.running)) + FINISHING)
        batch.upcoming = [r for _, r in zip(range(seats), self.waiting) if not r.num_pending and self._prompt_shared(r)]
        return batch

    def _prompt_shared(self, req: Request) -> bool:
        """Sequences 1..n-1 of a request wait until sequence 0's prompt has been launched by an earlier
        step: its KV blocks are then in the prefix cache, and admission maps them into the waiting
        sequences' slots as aliases, so the n sequences share one prefill (only a last, partial block
        is computed again)."""
        first = req.share_prompt_of
        return first is None or first.finished or (first.prompt_scheduled is not None
                                                   and first.prompt_scheduled < self.num_schedules)

    def _add(self, batch: ScheduledBatch, req: Request, n: int) -> None:
        batch.requests.append(req)
        batch.num_new_tokens.append(n)
        batch.starts.append(req.num_computed_tokens)
        if req.params.prompt_logprobs is not None:  # rows not computed before (a recompute skips them)
            first, stop = req.num_prompt_rows, min(req.num_computed_tokens + n, len(req.prompt_token_ids) - 1)
            assert req.num_computed_tokens <= first or first >= stop, "a prompt row's token was taken from the cache"
            if first < stop:
                batch.prompt_rows.append((len(batch.requests) - 1, first, stop))
                req.num_prompt_rows = stop
        req.num_computed_tokens += n
        if req.prompt_scheduled is None and req.num_computed_tokens >= len(req.prompt_token_ids):
            req.prompt_scheduled = self.num_schedules
        if req.num_computed_tokens == req.num_tokens:  # every known token computed: the step samples the next
            batch.samplers.append(req)
            batch.sample_steps.append(req.num_scheduled_outputs)
            req.num_pending += 1

    def update(self, batch: ScheduledBatch, sampled: list[int], logprobs: list | None = None) -> list[Request]:
        """Takes the step's sampled tokens (one per batch.samplers) and their logprobs (None where not
        asked for). Returns the requests that got one (finished ones included); token-based stops
        (EOS, stop token ids, max_tokens) end them here. A request that finished or was aborted while
        the step ran drops its token."""
        got = []
        for req, token, lp in zip(batch.samplers, sampled, logprobs or [None] * len(sampled)):
            req.num_pending -= 1
            if req.status is RequestStatus.FINISHED:
                continue
            req.output_token_ids.append(token)
            if lp is not None:
                req.output_logprobs.append(lp)
            got.append(req)
            p = req.params  # (before min_tokens, the sampler never picks a stop token)
            if token in self.eos_token_ids and not p.ignore_eos:
                self.finish(req, "stop")
            elif token in p.stop_token_ids:
                self.finish(req, "stop", token)
            elif len(req.output_token_ids) >= req.max_tokens:
                self.finish(req, "length")
        return got

    def _preempt(self, req: Request) -> None:
        """Recompute later: its slot goes idle, keeping the KV computed so far, which re-admission
        finds again through the prefix cache unless the pages were reclaimed meanwhile."""
        self.kv.release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str, stop_reason: str | int | None = None, error: str | None = None) -> None:
        """A request is done, running or (preempted with a token in flight) waiting; a running one's
        slot goes idle keeping its KV for reuse."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self.kv.release(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._finish(req, reason, stop_reason, error)

    def abort(self, request_id: str) -> Request | None:
        """Drops a request wherever it is; its slot goes idle at once (its pages reclaimable)."""
        for req in list(self.waiting) + self.running:
            if req.request_id == request_id:
                self.finish(req, "abort")
                return req
        return None

    @staticmethod
    def _finish(req: Request, reason: str, stop_reason: str | int | None = None, error: str | None = None) -> None:
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.error = error
        req.metrics.finished_time = time.monotonic()

    def tokens_held(self) -> dict[int, int]:
        """Tokens whose KV each running request's slot holds or a launched step writes."""
        return {r.slot.index: r.num_computed_tokens for r in self.running}
