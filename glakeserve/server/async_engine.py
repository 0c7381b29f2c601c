"""The engine on a thread of its own, for the HTTP server.

Handlers validate a request at once (so bad ones get a 400 and change nothing), then hand it to the
engine thread, which adds it between steps and streams its outputs back to the handler's event loop.
Aborts (a client gone) are applied between steps too, so a step is never cut in half.
"""

from __future__ import annotations

import asyncio
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
        self._adds: deque[tuple[str, list[int], SamplingParams, bool]] = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="glake-engine", daemon=True)
        self._thread.start()

    # ----- called from the event loop -------------------------------------------------------
    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return self.engine.validate_request(prompt, params)[1]

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, step by step (or only the last, unless stream); leaving the
        iterator early aborts the request."""
        if self.dead:
            raise EngineDeadError(self.dead)
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            self._streams[rid] = (asyncio.get_running_loop(), queue)
            self._adds.append((rid, prompt_ids, params, stream))
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)
            with self._cv:
                self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

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
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

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
                    for rid in aborts:
                        engine.abort_request(rid)
                    for rid, ids, params, stream in adds:
                        try:
                            engine.add_request(ids, params, request_id=rid, stream=stream)
                        except ValueError as e:
                            self._deliver(rid, e)
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
