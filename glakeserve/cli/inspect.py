"""`glake inspect-memory`: the KV allocator's state, from a short demo workload on the engine or
from a running server (--url)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from rich.console import Console
from rich.live import Live

from glakeserve.cli.memory_view import render_snapshot
from glakeserve.sampling import SamplingParams

DEMO = [  # (prompt, tokens to generate): two finish early and keep their pages, two still run
    ("Write a long story about a lighthouse keeper and the sea.", 400),
    ("Name three colours.", 6),
    ("Explain, step by step, how a bicycle gear works.", 400),
    ("Say hello.", 3),
]


class DemoWorkload:
    """A few requests on a real engine, stopped mid-flight (or stepped on with --watch)."""

    def __init__(self, llm):
        self.llm = llm
        for prompt, n in DEMO:
            llm.engine.add_request(llm.tokenizer.chat_ids([{"role": "user", "content": prompt}]) if llm.tokenizer
                                   else list(range(1, 40)), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        self.advance(12)

    def advance(self, steps: int) -> None:
        for _ in range(steps):
            if self.llm.engine.has_unfinished_requests():
                self.llm.engine.step()

    def snapshot(self) -> dict:
        return self.llm.engine.memory_snapshot()


def _request(url: str, path: str, api_key: str | None, body: dict | None = None, timeout: float = 10) -> dict:
    """JSON from a glake server; an HTTP error status is raised as urllib's HTTPError for the caller."""
    req = urllib.request.Request(url.rstrip("/") + path, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"cannot reach a glake server at {url} ({e}); is `glake serve` running?") from None


def fetch_snapshot(url: str, api_key: str | None = None) -> dict:
    try:
        return _request(url, "/v1/memory", api_key)
    except urllib.error.HTTPError as e:
        raise ConnectionError(f"{url} answered {e.code}: {e.read().decode(errors='replace')[:200]}") from None


def post_limit(url: str, max_bytes: int, api_key: str | None = None) -> dict:
    try:
        return _request(url, "/v1/memory/limit", api_key, {"max_bytes": max_bytes}, timeout=30)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError):
            message = f"HTTP {e.code}"
        raise ValueError(f"the server refused the limit: {message}") from None


def show(console: Console, get_snapshot, as_json: bool, watch: float | None, advance=None) -> None:
    if as_json:
        print(json.dumps(get_snapshot(), indent=2))
        return
    if watch is None:
        console.print(render_snapshot(get_snapshot()))
        return
    with Live(render_snapshot(get_snapshot()), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(watch)
                if advance is not None:
                    advance()
                live.update(render_snapshot(get_snapshot()))
        except KeyboardInterrupt:
            pass
