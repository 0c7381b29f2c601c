"""`glake serve` as a subprocess for the server tests: a free port on 127.0.0.1, start-up bounded in
time, output to a file (a pipe nobody reads can block the server), stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
