"""The app's outermost layer: a request id, the API key, refusals while the server cannot take work,
the body-size limit by Content-Length, and the last word on errors (OpenAI's JSON shape, one log
entry with the request id, and the connection kept).

A plain ASGI middleware, not @app.middleware("http"): that wraps the request so that a handler no
longer sees its client disconnect."""

from __future__ import annotations

import hmac
import json
import sys
import traceback
import uuid
from typing import TYPE_CHECKING

from starlette.datastructures import Headers

from glakeserve.server.protocol import ApiError

if TYPE_CHECKING:
    from glakeserve.server.api import ServerState

REQUEST_ID = "glake.request_id"  # the scope key handlers read the id from


def bearer_token(header: str | None) -> str | None:
    """The token of 'Authorization: Bearer <token>' (RFC 6750 2.1); the scheme is case-insensitive
    (RFC 9110 11.1)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip(" ")
    return token if scheme.lower() == "bearer" and token else None


def key_matches(token: str | None, key: str) -> bool:
    """Constant-time comparison. Starlette decodes headers as latin-1: encoding back gives the bytes sent."""
    if token is None:
        return False
    return hmac.compare_digest(token.encode("latin-1", "replace"), key.encode("utf-8"))


def error_response_messages(error: ApiError, request_id: str | None = None,
                            headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    body = json.dumps(error.body(), ensure_ascii=True).encode()  # ascii: a client's lone surrogate survives
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if request_id:
        raw.append((b"x-request-id", request_id.encode()))
    return ({"type": "http.response.start", "status": error.status, "headers": raw},
            {"type": "http.response.body", "body": body, "more_body": False})


def log_internal_error(request_id: str, what: str, exc: BaseException) -> None:
    """One entry per bug, with the request id the client was given."""
    tb = "".join(traceback.format_exception(exc)).rstrip()
    print(f"glake serve: internal error in request {request_id} ({what}):\n{tb}", file=sys.stderr, flush=True)


class Guard:
    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"req-{uuid.uuid4().hex[:20]}"
        scope[REQUEST_ID] = rid
        refusal = self._refusal(scope)
        if refusal is not None:
            error, headers = refusal
            for message in error_response_messages(error, rid, headers):
                await send(message)
            return
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # a bug (Starlette answered it and re-raised): log it once, keep the connection
            log_internal_error(rid, f"{scope['method']} {scope['path']}", e)
            if not started:
                error = ApiError(500, f"internal server error (request {rid}); the server log has the details")
                for message in error_response_messages(error, rid):
                    await send(message)

    def _refusal(self, scope) -> tuple[ApiError, list] | None:
        state, config = self.state, self.state.config
        path, method = scope["path"], scope["method"]
        headers = Headers(scope=scope)
        api = path.startswith("/v1/")
        if api and config.api_key:
            token = bearer_token(headers.get("authorization"))
            if not key_matches(token, config.api_key):
                challenge = b'Bearer realm="glake"' + (b', error="invalid_token"' if token else b"")
                why = "invalid API key" if token else "missing API key"
                return (ApiError(401, f"{why}: send 'Authorization: Bearer <key>'"),
                        [(b"www-authenticate", challenge)])
        if api and method == "POST":
            if state.draining:
                return (ApiError(503, "the server is shutting down and takes no new requests; retry on another "
                                      "instance"), [(b"connection", b"close")])
            if state.engine.dead:
                return ApiError(503, "the engine has failed; restart the server"), []
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_size:
            return (ApiError(413, f"the request body is {int(length)} bytes, more than this server accepts "
                                  f"({config.max_body_size} bytes, --max-body-size)"), [])
        return None
