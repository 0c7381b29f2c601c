"""Start and stop: the listening socket (bound before the model loads, so a bad address fails in a
second, not after a minute of loading), and uvicorn with glake's shutdown.

Shutdown, on the first SIGTERM or SIGINT (one line printed per phase):
1. stop accepting: the listener closes, idle connections close, new requests get 503, /health 503;
2. running requests finish, for up to the grace period;
3. what still runs then is ended with finish_reason "shutdown" (streams get their last chunk,
   non-streaming clients what was generated), responses are flushed, the process exits 0.
A second signal exits at once (status 128 + the signal's number), without tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading
import time

import uvicorn

from glakeserve.server.api import ServerState

FLUSH_S = 10.0  # after the grace period, how long the ended requests' responses may take to go out


def resolve(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address or a name that resolves here "
                         f"({getattr(e, 'strerror', None) or e})") from None


def is_loopback(host: str) -> bool:
    """Every address the host resolves to is this machine's loopback."""
    addresses = {info[4][0] for info in resolve(host, 0)}
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a ValueError that says what to do."""
    family, kind, proto, _, address = resolve(host, port)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is already in use (another server?): stop it or pick "
                             f"another --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"--host {host} is not an address of this machine: use one of its addresses, "
                             f"127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
        if e.errno == errno.EACCES:
            raise ValueError(f"port {port} needs privileges to bind: pick a --port above 1023") from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def say(line: str) -> None:
    """One line to stdout; os.write, as it may run in a signal handler (print is not reentrant)."""
    os.write(sys.stdout.fileno(), f"glake serve: {line}\n".encode())


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float):
        config.timeout_graceful_shutdown = grace_s + FLUSH_S  # uvicorn's backstop: cancels what is left
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self.signalled_at: float | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own re-raises the signal once it has stopped (exit status 143, or a KeyboardInterrupt
        # traceback); here a handled signal ends in exit 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, _frame) -> None:
        name = signal.Signals(sig).name
        running = self.state.engine.num_requests
        if self.should_exit:
            say(f"{name} again: exiting now" + (f", {running} request(s) cut off" if running else ""))
            os._exit(128 + sig)
        self.should_exit = True
        self.state.draining = True
        self.signalled_at = time.monotonic()
        if running:
            say(f"{name}: no longer accepting requests; waiting up to {self.grace_s:g}s for {running} running "
                f"request(s) ({name} again exits now)")
        else:
            say(f"{name}: no longer accepting requests; none running")

    async def shutdown(self, sockets=None) -> None:
        self.state.draining = True
        drain = asyncio.ensure_future(self._drain())
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()

    async def _drain(self) -> None:
        t0 = self.signalled_at or time.monotonic()
        had = self.state.engine.num_requests
        while self.state.engine.num_requests and time.monotonic() - t0 < self.grace_s:
            await asyncio.sleep(0.05)
        ended = self.state.engine.abort_all("shutdown") if self.state.engine.num_requests else 0
        if ended:
            say(f"grace period of {self.grace_s:g}s over: ended {ended} request(s) with finish_reason \"shutdown\"")
        elif had:
            say(f"all requests finished after {time.monotonic() - t0:.1f}s")
