"""`glake serve` start and stop (issue 11): argument errors before the model loads, the request
deadline, SIGTERM that drains live streams within the grace period, a second signal that exits at
once. Bounded in time; only 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from glakeserve.cli.app import app
from serve_helpers import Server

MODEL = "SmolLM2-135M-Instruct"
GRACE_S = 2.0
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}


# ----- start-up errors: before the model loads, one line, no traceback --------------------------
@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port"),
    (["--port", "0"], "--port"),
    (["--host", "no-such-host.invalid"], "is not an address or a name that resolves"),
    (["--host", "192.0.2.1"], "is not an address of this machine"),
    (["--max-body-size", "12"], "--max-body-size takes bytes"),
    (["--request-timeout", "0"], "--request-timeout takes a positive number"),
])
def test_argument_errors_come_before_the_model_loads(args, message):
    out = CliRunner().invoke(app, ["serve", *args])
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and message in text and "Traceback" not in text, out.output
    assert "loading the model" not in text


def test_a_port_in_use_is_refused_before_the_model_loads(busy_port):
    out = CliRunner().invoke(app, ["serve", "--port", str(busy_port)])
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and f"port {busy_port} on 127.0.0.1 is already in use" in text, out.output
    # beyond loopback without a key: a warning first (the port in use stops it before it listens)
    out = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", str(busy_port)])
    text = " ".join(out.output.split())
    assert out.exit_code == 2 and "warning: 0.0.0.0 is reachable from other machines" in text, out.output


# ----- servers for the shutdown tests (started together: start-up dominates) ---------------------
@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    d = tmp_path_factory.mktemp("lifecycle")
    args = ["--max-model-len", "512", "--max-num-seqs", "8", "--kv-cache-memory", "64MiB"]
    graceful = Server([*args, "--shutdown-timeout", str(GRACE_S)], d / "graceful.log")
    hasty = Server([*args, "--request-timeout", "1.5"], d / "hasty.log")
    graceful.wait_ready(), hasty.wait_ready()
    yield graceful, hasty
    for s in (graceful, hasty):
        if s.proc.poll() is None:
            s.proc.kill()
        s.stop()


class Stream(threading.Thread):
    """A streaming completion read chunk by chunk."""

    def __init__(self, url: str, body: dict):
        super().__init__()
        self.url, self.body, self.chunks, self.done, self.error = url, {**body, "stream": True}, [], False, None

    def run(self):
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line[6:]))
        except Exception as e:  # collected for the assertions
            self.error = e

    @property
    def finish_reason(self):
        return self.chunks[-1]["choices"][0]["finish_reason"] if self.chunks else None


def start_streams(url: str, n: int) -> list[Stream]:
    streams = [Stream(url, LONG) for _ in range(n)]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 120
    while not all(len(s.chunks) >= 2 for s in streams):
        assert time.monotonic() < deadline and not any(s.error for s in streams), [s.error for s in streams]
        time.sleep(0.05)
    return streams


def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    proc.wait(timeout=timeout)
    return time.monotonic() - t0


def test_request_timeout_ends_a_request_with_what_it_generated(servers):
    _, hasty = servers
    r = httpx.post(hasty.url + "/v1/completions", json=LONG, timeout=60)
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert r.status_code == 200 and choice["finish_reason"] == "timeout"
    assert 0 < usage["completion_tokens"] < 400 and choice["text"]
    stream = Stream(hasty.url, LONG)
    stream.run()
    assert stream.done and stream.finish_reason == "timeout" and stream.error is None


def test_sigterm_lets_streams_end_with_a_final_chunk_and_exits_0(servers):
    graceful, _ = servers
    streams = start_streams(graceful.url, 4)
    plain = {}
    waiter = threading.Thread(target=lambda: plain.setdefault(
        "r", httpx.post(graceful.url + "/v1/completions", json=LONG, timeout=120)))
    waiter.start()
    time.sleep(0.5)
    graceful.proc.send_signal(signal.SIGTERM)
    took = wait_exit(graceful.proc, GRACE_S + 30)
    for s in streams:
        s.join(timeout=30)
    waiter.join(timeout=30)
    print(f"SIGTERM with 5 live requests: exit after {took:.1f} s (grace {GRACE_S} s)")
    log = graceful.log()
    assert graceful.proc.returncode == 0, log
    assert took < GRACE_S + 15, log
    for s in streams:
        assert s.error is None and s.done and s.finish_reason == "shutdown", (s.error, s.chunks[-1:])
    assert plain["r"].status_code == 200 and plain["r"].json()["choices"][0]["finish_reason"] == "shutdown"
    assert "SIGTERM: no longer accepting requests; waiting up to 2s for 5 running request(s)" in log, log
    assert 'grace period of 2s over: ended 5 request(s) with finish_reason "shutdown"' in log, log
    assert "stopped" in log and "Traceback" not in log, log
    with pytest.raises(httpx.ConnectError):
        httpx.get(graceful.url + "/health", timeout=5)


def test_a_second_signal_exits_at_once_without_tracebacks(servers):
    _, hasty = servers
    streams = [Stream(hasty.url, LONG) for _ in range(2)]
    for s in streams:
        s.start()
    time.sleep(0.3)
    hasty.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "no longer accepting requests" not in hasty.log():
        assert time.monotonic() < deadline, hasty.log()
        time.sleep(0.05)
    hasty.proc.send_signal(signal.SIGINT)
    took = wait_exit(hasty.proc, 30)
    log = hasty.log()
    assert hasty.proc.returncode == 128 + signal.SIGINT and "SIGINT again: exiting now" in log, log
    assert "Traceback" not in log and "CancelledError" not in log, log
    print(f"second signal: exit after {took:.2f} s")
    for s in streams:
        s.join(timeout=30)
