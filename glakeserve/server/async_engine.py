"""The engine on a thread of its own, for the HTTP server.

Handlers validate a request first (so bad ones get a 400 and change nothing), then hand it to the
engine thread, which adds it between steps and streams its outputs back to the handler's event loop.
Aborts are applied between steps too, so a step is never cut in half: a request whose client went
away is gone before the next step, and its pages with it. The server can also end a request itself
(its deadline passed, or the server is shutting down): it then gets a last output whose
finish_reason says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import AsyncIterator

from glakeserve.engine import LLMEngine
from glakeserve.request import RequestOutput
from glakeserve.sampling import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine thread failed; the server can no longer generate."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    params: SamplingParams
    stream: bool


class AsyncEngine:
    def __init__(self, engine: LLMEngine, idle_release_s: float = 0.0):
        """idle_release_s > 0: after that long with no request, free KV pages go back to the driver
        (the pool grows again under load, up to its limit)."""
        self.engine = engine
        self.idle_release_s = idle_release_s
        self.released_pages = 0
        self.dead: str | None = None
        self._cv = threading.Condition()  # guards the hand-off queues and streams; never held over a step
        self._engine_lock = threading.Lock()  # held over a step, and by call()
        self._adds: deque[tuple] = deque()  # add_request's arguments, one tuple per sequence
        self._aborts: deque[tuple[str, str | None]] = deque()  # (request id, reason the client is told or None)
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="glake-engine", daemon=True)
        self._thread.start()

    # ----- called from the event loop -------------------------------------------------------
    @property
    def num_requests(self) -> int:
        """Requests handed to the engine and not yet finished (waiting or running)."""
        return len(self._streams)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       stream: bool = True, timeout: float | None = None, share_prompt_of: str | None = None,
                       index: int = 0) -> AsyncIterator[RequestOutput]:
        """Outputs of one sequence, step by step (or only the last, unless stream); leaving the
        iterator early aborts it. timeout: seconds after which the engine ends it, with
        finish_reason "timeout" and what it generated so far. share_prompt_of, index: as
        LLMEngine.add_request (sequence `index` of a request with n > 1)."""
        if self.dead:
            raise EngineDeadError(self.dead)
        rid = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            self._streams[rid] = _Stream(loop, queue, params, stream)
            self._adds.append((rid, prompt_ids, params, stream, share_prompt_of, index))
            self._cv.notify()
        deadline = loop.call_later(timeout, self.abort, rid, "timeout") if timeout else None
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has dropped it already
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if deadline is not None:
                deadline.cancel()
            if not finished:
                self.abort(rid)
            with self._cv:
                self._streams.pop(rid, None)

    def abort(self, request_id: str, reason: str | None = None) -> None:
        """Ends a request before the next step. reason None: its client is gone (nothing is sent);
        else its stream gets a last output with this finish_reason."""
        with self._cv:
            self._aborts.append((request_id, reason))
            self._cv.notify()

    def abort_all(self, reason: str) -> int:
        """Ends every request before the next step, each with a last output saying `reason`."""
        with self._cv:
            rids = list(self._streams)
            self._aborts.extend((rid, reason) for rid in rids)
            self._cv.notify()
        return len(rids)

    def call(self, fn):
        """Runs fn(engine) between steps (for stats and snapshots). Blocks for up to one step: call it
        from a worker thread (asyncio.to_thread), not from the event loop."""
        with self._engine_lock:
            return fn(self.engine)

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ----- the engine thread ----------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is not None:
            try:
                target.loop.call_soon_threadsafe(target.queue.put_nowait, item)
            except RuntimeError:  # that event loop has closed (the server is stopping): nobody to tell
                pass

    def _ended(self, out: RequestOutput, reason: str) -> RequestOutput:
        """An aborted request's last output, with finish_reason `reason` and, for a request that
        does not stream, its text so far (the engine decodes that only when a request finishes)."""
        target = self._streams.get(out.request_id)
        text = out.text
        if target is not None and not target.stream and self.engine.tokenizer is not None and out.token_ids:
            text = self.engine.tokenizer.decode(out.token_ids, target.params.skip_special_tokens)
        return dataclasses.replace(out, finish_reason=reason, text=text)

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                idle_since = time.monotonic()
                while not (self._stopping or self._adds or self._aborts or engine.has_unfinished_requests()):
                    timeout = None
                    if self.idle_release_s > 0:
                        timeout = idle_since + self.idle_release_s - time.monotonic()
                        if timeout <= 0:
                            with self._engine_lock:
                                self.released_pages += engine.release_idle_memory()
                            idle_since, timeout = float("inf"), None  # once per idle period
                    self._cv.wait(timeout)
                if self._stopping:
                    return
                aborts, self._aborts = list(self._aborts), deque()
                adds, self._adds = list(self._adds), deque()
            try:
                with self._engine_lock:
                    # adds first: a request whose client left before it was added is then aborted here
                    for rid, ids, params, stream, share, index in adds:
                        try:
                            engine.add_request(ids, params, request_id=rid, stream=stream, share_prompt_of=share,
                                               index=index)
                        except ValueError as e:
                            self._deliver(rid, e)
                    for rid, reason in aborts:
                        out = engine.abort_request(rid)
                        if out is not None and reason is not None:
                            self._deliver(rid, self._ended(out, reason))
                    outputs = engine.step() if engine.has_unfinished_requests() else []
            except Exception:  # the engine is broken: fail everyone, refuse new work
                self.dead = traceback.format_exc(limit=5)
                with self._cv:
                    for rid in list(self._streams):
                        self._deliver(rid, EngineDeadError("the engine failed; see the server log"))
                print(f"glake serve: the engine failed:\n{self.dead}", flush=True)
                return
            for out in outputs:
                self._deliver(out.request_id, out)
