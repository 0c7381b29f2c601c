"""Continuous batching: FCFS admission, chunked prefill under a token budget, preemption by
recompute. Requests are counters: each step gives a request min(tokens it lacks, budget left) new
tokens to compute; prefill, chunked prefill and decode are the same rule."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from glakeserve.kv_cache import KVCache
from glakeserve.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # can never fit: finished with an error

    @property
    def empty(self) -> bool:
        return not self.requests

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, kv: KVCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # 1. running requests, oldest first; the newest are preempted when pages run out
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.ensure(req.slot, req.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        # 2. waiting requests, first come first served, unless memory was short this step
        while not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            slot = self.kv.acquire_slot(req.request_id, req.num_tokens)
            if slot is None:
                break
            req.num_computed_tokens = self.kv.attach_prefix(slot, req)  # KV the prefix cache already holds
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.ensure(slot, req.num_computed_tokens + n):
                req.num_computed_tokens = 0
                self.kv.release_slot(slot, keep_pages=True)
                if not self.running:  # alone and still no room: it can never run
                    self.waiting.popleft()
                    self._finish(req, "abort", error="the KV cache cannot hold this request; raise kv_cache_memory")
                    batch.failed.append(req)
                    continue
                break
            self.waiting.popleft()
            req.slot = slot
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = time.monotonic()
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def index_prompts(self) -> None:
        """After a step: put running requests' newly completed prompt pages in the prefix cache
        (pages of generated tokens wait for the request to finish: fewer driver calls per step)."""
        for r in self.running:
            self.kv.index_request(r, min(r.num_computed_tokens, len(r.prompt_token_ids)))

    def map_ahead(self) -> None:
        """After a step: queue pages for the next tokens of every running request on the worker."""
        wanted = [(r.slot, r.num_tokens + self.kv.lookahead_tokens) for r in self.running]
        self.kv.map_ahead(wanted)

    def _preempt(self, req: Request) -> None:
        """Recompute later: its KV is dropped now and rebuilt from its tokens when re-admitted."""
        self.kv.release_slot(req.slot, keep_pages=False)
        req.slot = None
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str, stop_reason: str | int | None = None) -> None:
        """A running request is done; its pages go to the prefix cache, and its slot keeps them for
        the next request (deferred reclamation)."""
        self.kv.index_request(req, req.num_computed_tokens, finished=True)
        self.running.remove(req)
        self.kv.release_slot(req.slot, keep_pages=True)
        req.slot = None
        self._finish(req, reason, stop_reason)

    def abort(self, request_id: str) -> Request | None:
        """Drops a request wherever it is; its pages go back to the pool at once."""
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._finish(req, "abort")
                return req
        for req in self.running:
            if req.request_id == request_id:
                self.running.remove(req)
                self.kv.release_slot(req.slot, keep_pages=False)
                req.slot = None
                self._finish(req, "abort")
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
        """Tokens whose KV each running request's slot holds now (for integrity checks and stats)."""
        return {r.slot.index: r.num_computed_tokens for r in self.running}
