"""`glake serve` as a subprocess for the server tests: a free port on 127.0.0.1, start-up bounded in
time, output to a file (a pipe nobody reads can block the server), stopped at the end."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

GLAKE = os.path.join(os.path.dirname(sys.executable), "glake")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path, key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log_path = log
        self._log = open(log, "w")
        extra = ["--api-key", key] if key else []
        self.proc = subprocess.Popen([GLAKE, "serve", "--port", str(self.port), *extra, *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 240) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def get(self, path: str, timeout: float = 30) -> dict:
        req = urllib.request.Request(self.url + path, headers=self.headers)
        return json.loads(urllib.request.urlopen(req, timeout=timeout).read())

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def soak(server: Server, seconds: float, streaming: int, plain: int, seed: int = 0,
               max_tokens: int = 10) -> dict:
    """`streaming` + `plain` clients, each sending one request after another for `seconds`, half chat
    and half completions; about 30% hang up (a stream after a few chunks, a plain request after a
    random 0.05-1 s). Returns counts of finished and disconnected requests and every error (a
    status other than 200, an error event, a stream without a finish_reason or [DONE], an exception)."""
    rng = random.Random(seed)
    tally = {"finished": 0, "disconnected": 0, "errors": []}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=streaming + plain + 8, max_keepalive_connections=streaming + plain + 8)

    async def one(c: httpx.AsyncClient, stream: bool):
        chat = rng.random() < 0.5
        body = { "max_tokens": rng.randint(2, max_tokens), "temperature": 0.8, "stream": stream}
        if chat:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": f"Count to {rng.randint(3, 99)}"}]
        else:
            path, body["prompt"] = "/v1/completions", f"Story number {rng.randint(0, 10**6)}:"
        hang_up = rng.random() < 0.3
        if not stream:
            timeout = httpx.Timeout(120, read=rng.uniform(0.05, 1.0) if hang_up else 120)
            try:
                r = await c.post(path, json=body, timeout=timeout)
            except httpx.ReadTimeout:
                tally["disconnected"] += 1
                return
            if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
                tally["errors"].append((r.status_code, r.text[:200]))
            else:
                tally["finished"] += 1
            return
        after = rng.randint(0, 4)
        async with c.stream("POST", path, json=body, timeout=120) as r:
            if r.status_code != 200:
                tally["errors"].append((r.status_code, (await r.aread())[:200]))
                return
            lines, reasons = 0, []
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                lines += 1
                if hang_up and lines > after:
                    tally["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
                if line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        tally["errors"].append(chunk)
                    reasons += [ch["finish_reason"] for ch in chunk["choices"] if ch["finish_reason"]]
                elif reasons in (["stop"], ["length"]):
                    tally["finished"] += 1
                    return
            tally["errors"].append(("stream ended without [DONE] or finish_reason", reasons))

    async def client(c: httpx.AsyncClient, stream: bool):
        while time.monotonic() < deadline:
            try:
                await one(c, stream)
            except Exception as e:  # collected: the soak reports every error
                tally["errors"].append(repr(e))

    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, limits=limits) as c:
        await asyncio.wait_for(asyncio.gather(*([client(c, True) for _ in range(streaming)]
                                                + [client(c, False) for _ in range(plain)])), seconds + 180)
    return tally


class InProcess:
    """The server's app over a real engine in this process, without a socket: a test can reach into
    the engine (count its grammar compiles, fail one of its requests) while its requests go through
    the whole HTTP layer. httpx's ASGI transport hands a streamed response over once it has ended."""

    def __init__(self, model: Path, **engine_kwargs):
        from glakeserve.llm import LLM
        from glakeserve.server.api import ServerConfig, build_app
        from glakeserve.server.async_engine import AsyncEngine

        self.llm = LLM(model=str(model), **engine_kwargs)
        self.engine = AsyncEngine(self.llm.engine)
        self.app = build_app(self.engine, ServerConfig(served_model_name="tiny"))

    def post(self, *requests: tuple[str, dict]) -> list[httpx.Response]:
        """(path, body) requests sent at the same time; their responses in order."""
        async def send():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(self.app), base_url="http://in-process",
                                         timeout=120) as c:
                return await asyncio.gather(*(c.post(path, json=body) for path, body in requests))

        return asyncio.run(send())

    def close(self) -> None:
        self.app.state.close()
        self.engine.shutdown()
        self.llm.close()


def sse_events(text: str) -> list:
    """The data events of a streamed response's body, parsed ("[DONE]" stays a string)."""
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in text.splitlines()
            if line.startswith("data: ")]
