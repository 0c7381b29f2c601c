"""The HTTP API: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health,
/metrics (Prometheus) and /v1/memory (what `glake inspect-memory --url` shows).

A request goes: Guard (key, refusals, size) -> body (JSON, checked fields) -> the tokenizer thread
-> the engine thread. A request ends when it finishes, when its client goes away (aborted before
the next step, streaming or not), when its deadline passes (finish_reason "timeout"), when the
server shuts down (finish_reason "shutdown"), or when the engine fails it (a 500, or in a stream an
error event before [DONE])."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from glakeserve.request import RequestOutput
from glakeserve.server import protocol as P
from glakeserve.server import tools as T
from glakeserve.server.async_engine import AsyncEngine, EngineDeadError
from glakeserve.server.metrics import prometheus
from glakeserve.server.middleware import REQUEST_ID, Guard, log_internal_error
from glakeserve.server.prompts import PromptEncoder
from glakeserve.server.protocol import ApiError
from glakeserve.structured import GuidedDecoding

# one completions request starts len(prompt) x best_of sequences, each a request in the engine; past
# this many, one small body could queue millions of them
MAX_SEQUENCES_PER_REQUEST = 1024


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_size: int = 4 << 20  # bytes of a request body; beyond: 413
    request_timeout: float | None = None  # seconds a request may take; then finish_reason "timeout"
    max_queued_prompt_chars: int = 16 << 20  # prompt characters waiting for the tokenizer; beyond: 429
    loopback_only: bool = True  # bound to this machine only: /v1/memory/limit may go without a key


class ServerState:
    """What the app shares with its Guard and with the shutdown sequence."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.draining = False  # set on the first SIGTERM/SIGINT: no new requests
        self.close = lambda: None  # stops the tokenizer thread


class ApiJSONResponse(JSONResponse):
    def render(self, content) -> bytes:  # ascii: a client's lone surrogate echoed in a message still encodes
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error(e: ApiError) -> ApiJSONResponse:
    return ApiJSONResponse(e.body(), status_code=e.status)


class _ClientGone(Exception):
    pass


def build_app(engine: AsyncEngine, config: ServerConfig) -> Guard:
    """The ASGI app to serve: the Guard around FastAPI's app (outermost, so that its refusals are
    what the client sees). Its .state is the ServerState."""
    app = FastAPI(title="GlakeServe", docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=config.max_body_size)  # counts bodies sent without Content-Length
    state = ServerState(engine, config)
    encoder = PromptEncoder(engine.engine, config.max_queued_prompt_chars)
    state.close = encoder.close
    vocab = engine.engine.model_config.vocab_size
    tok = engine.engine.tokenizer
    tool_format = tok.tool_format if tok is not None else None  # how the chat template writes tool calls
    name = config.served_model_name
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _error(e)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, _: Exception):  # Starlette re-raises it: the Guard logs it
        rid = request.scope.get(REQUEST_ID)
        return _error(ApiError(500, f"internal server error (request {rid}); the server log has the details"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404, 405, the body limit's 413
        if e.status_code == 413:
            message = f"the request body is larger than this server accepts ({config.max_body_size} bytes, " \
                      f"--max-body-size)"
        elif e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return ApiJSONResponse(ApiError(e.status_code, message).body(), status_code=e.status_code,
                               headers=getattr(e, "headers", None))

    # ----- the request path -----------------------------------------------------------------
    async def read_body(request: Request, fields: set[str], endpoint: str) -> dict:
        body = P.parse_body(await request.body())
        P.check_fields(body, fields, endpoint)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {P.short(model)}", param="model")
        if model is not None and model != name:
            shown = f"`{model}`" if isinstance(model, str) and len(model) <= 200 else P.short(model)
            raise ApiError(404, f"The model {shown} does not exist. This server serves `{name}`.", param="model")
        return body

    def start(ids: list[int], params, rid: str, stream: bool, share: str | None, index: int
              ) -> AsyncIterator[RequestOutput]:
        if state.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests; retry on another instance")
        return engine.generate(ids, params, rid, stream=stream, timeout=config.request_timeout, share_prompt_of=share,
                               index=index)

    async def check_guided(body: dict, params, field: str | None = None) -> None:
        """Compiles the request's grammar off the event loop (cached for the engine): a 400 naming the
        field (by default the one that gave the grammar) when the library cannot compile it."""
        if params.guided is not None:
            try:
                await asyncio.to_thread(engine.engine.compile_guided, params.guided)
            except ValueError as e:
                field = field or P.guided_field(body)
                raise ApiError(400, f"{field}: {e}", param=field) from None

    async def check_forced(tools: T.ToolRequest, forced: GuidedDecoding) -> None:
        """Compiles the grammar of a forced call (tool_choice required or named), which the engine then
        finds cached; a 400 naming the tool whose parameters cannot be compiled. Under auto and none
        nothing is compiled: each tool set would take grammars into the engine's cache of 64 and push
        out ones compiled for requests not yet added, which the engine thread would then compile again
        holding its lock (every request waits); tool_request checked the schemas against the
        meta-schema instead."""
        try:
            await asyncio.to_thread(engine.engine.compile_guided, forced)
        except ValueError as e:
            names = list(tools.schemas)
            i = names.index(tools.name) if tools.choice == "function" else await failing_tool(tools)
            if i is None:  # each compiles alone: say what the whole one said
                raise ApiError(400, f"tool_choice: {e}", param="tool_choice") from None
            raise ApiError(400, f"tools[{i}].function.parameters: {e}", param="tools") from None

    async def failing_tool(tools: T.ToolRequest) -> int | None:
        """The index of the first tool whose parameters alone cannot be compiled."""
        for i, schema in enumerate(tools.schemas.values()):
            try:
                await asyncio.to_thread(engine.engine.compile_guided, GuidedDecoding.json_schema(schema))
            except ValueError:
                return i
        return None

    def tool_reply(tools: T.ToolRequest, text: str) -> tuple[str | None, list[dict]]:
        content, calls = tools.parse(text, tool_format)
        return content, [c.openai() for c in calls]

    def start_sequences(prompts: list[list[int]], params, best_of: int, rid: str, stream: bool) -> list:
        """best_of (>= n) sequences per prompt, prompt-major: sequence j of prompt i has params
        for_sequence(j) and shares sequence 0's prompt pages. With best_of > n every sequence keeps
        its logprobs, which rank them."""
        gens = []
        for i, ids in enumerate(prompts):
            for j in range(best_of):
                p = params.for_sequence(j)
                if best_of > params.n and p.logprobs is None:
                    p = dataclasses.replace(p, logprobs=0)
                gens.append(start(ids, p, f"{rid}-{i}-{j}", stream, f"{rid}-{i}-0" if j else None, j))
        return gens

    async def finish_all(request: Request, gens: list, params, best_of: int) -> tuple[list, list[RequestOutput]]:
        """The sequences' last outputs, grouped by prompt, and the n chosen of each prompt's best_of
        (P.choose). If the client goes away first, every sequence is aborted (their generators'
        cleanup) before the engine's next step. A sequence the engine ended with an error (the KV
        cache cannot hold it; a grammar rejected a token) is a 500 that says so, not a truncated reply."""
        tasks = [asyncio.ensure_future(_last(g)) for g in gens]
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending | {gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    raise _ClientGone
                pending.discard(gone)
                for t in done:
                    if t.exception() is not None:
                        raise _engine_error(t.exception())
            outs = [t.result() for t in tasks]
        finally:
            for t in (*tasks, gone):
                if not t.done():
                    t.cancel()
        for out in outs:
            if out.error:
                raise _failed(out)
        return P.choose(outs, params, best_of)

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    def stream_error(rid: str, failed: Exception | RequestOutput) -> str:
        """The event that ends a stream which cannot go on (its sequence failed, or the engine refused
        or lost it). As vLLM: `data: {"error": {...}}`, then only `data: [DONE]`, no finish_reason nor
        usage; the request's other sequences are aborted, as its reply is lost anyway."""
        if isinstance(failed, RequestOutput):
            return sse(_failed(failed).body())
        if isinstance(failed, (EngineDeadError, ValueError)):
            return sse(_engine_error(failed).body())
        log_internal_error(rid, "streaming", failed)
        return sse(ApiError(500, f"internal server error (request {rid}); the server log has the details").body())

    # ----- endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.dead:
            return ApiJSONResponse({"status": "engine failed"}, status_code=503)
        if state.draining:
            return ApiJSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started,
                                            "owned_by": "glakeserve", "max_model_len": engine.engine.max_model_len}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != name:
            shown = f"`{model_id}`" if len(model_id) <= 200 else P.short(model_id)
            raise ApiError(404, f"The model {shown} does not exist. This server serves `{name}`.", param="model")
        return (await models())["data"][0]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, P.CHAT_FIELDS, "/v1/chat/completions")
        stream, include_usage = P.stream_flags(body)
        messages = P.chat_messages(body)
        tools = T.tool_request(body)
        if tools is not None and tool_format is None:
            raise ApiError(400, f"this model's chat template has no tool support (it does not render tools), so "
                                f"`{name}` cannot take tools; serve a model whose chat template renders them "
                                f"(Llama 3.1, Qwen 2.5, Hermes) or send the request without tools", param="tools")
        forced = tools.forced() if tools is not None else None
        params = P.sampling_params(body, default_max_tokens=None, vocab_size=vocab, chat=True, forced=forced)
        best_of = P.best_of(body, params.n, stream)
        if forced is not None:
            await check_forced(tools, forced)
        else:
            await check_guided(body, params)
        ids = await encoder.encode(messages, params, "messages", list(tools.tools) if tools is not None else None)
        parse = tools is not None and tools.choice != "none"  # tool_choice none: the reply is content
        P.check_room(len(ids), params, body, engine.engine.max_model_len)
        rid = P.new_id("chatcmpl")
        gens = start_sequences([ids], params, best_of, rid, stream)
        if not stream:
            try:
                groups, chosen = await finish_all(request, gens, params, best_of)
            except _ClientGone:
                return Response(status_code=499)
            replies = [tool_reply(tools, o.text) for o in chosen] if parse else None
            return P.chat_response(rid, name, chosen, P.request_usage(groups, chosen), tok, replies)

        head = P.StreamHead(rid, "chat.completion.chunk", name, include_usage)

        async def chunks():
            for i in range(len(gens)):
                yield sse(P.chat_chunk(head, P.FIRST_DELTA, None, index=i))
            fan = _FanIn(gens)
            finals = [None] * len(gens)
            readers = [T.ToolStream(tools, tool_format) for _ in gens] if parse else None
            try:
                while (item := await fan.next()) is not None:
                    index, out = item
                    if isinstance(out, Exception) or out.error:
                        yield stream_error(request.scope[REQUEST_ID], out)
                        break
                    reason = P.finish_reason(out)
                    finals[index] = out if out.finished else None
                    if readers is not None:  # content while no call can have begun; calls at the end
                        content = readers[index].feed(out.delta_text)
                        delta = {"content": content} if content else {}
                        if out.finished:
                            rest, calls = readers[index].finish()
                            delta, reason = _tool_delta(out, delta, rest, [c.openai() for c in calls])
                        if delta or reason or out.delta_logprobs:
                            logprobs = P.chat_logprobs(out.delta_logprobs, tok)
                            yield sse(P.chat_chunk(head, delta, reason, logprobs, index))
                        continue
                    if out.delta_text or reason or out.delta_logprobs:
                        delta = {"content": out.delta_text} if out.delta_text else {}
                        yield sse(P.chat_chunk(head, delta, reason, P.chat_logprobs(out.delta_logprobs, tok), index))
            finally:  # the client went away (or a bug): no await here, the task is being cancelled
                fan.cancel()
            if include_usage and all(finals):
                yield sse(head.usage_chunk(P.request_usage([finals], finals)))
            yield sse("[DONE]")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, P.COMPLETION_FIELDS, "/v1/completions")
        stream, include_usage = P.stream_flags(body)
        prompts = P.completion_prompts(body)
        echo = P.echo_flag(body)
        params = P.sampling_params(body, default_max_tokens=16, vocab_size=vocab)
        best_of = P.best_of(body, params.n, stream)
        await check_guided(body, params)
        if echo and any(not isinstance(p, str) for p in prompts) and tok is None:
            raise ApiError(400, "echo of token-id prompts needs a tokenizer, and this model has none", param="echo")
        if params.logprobs is not None and tok is None:
            raise ApiError(400, "logprobs name their tokens' text, and this model has no tokenizer", param="logprobs")
        if len(prompts) * best_of > MAX_SEQUENCES_PER_REQUEST:
            raise ApiError(400, f"{len(prompts)} prompts x {best_of} sequences each (n / best_of) is "
                                f"{len(prompts) * best_of} sequences; one request may start at most "
                                f"{MAX_SEQUENCES_PER_REQUEST}: split it", param="prompt")
        ids = [await encoder.encode(p, params, "prompt") for p in prompts]  # token ids checked here, before echo decodes them
        echoed = [(p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False)) if echo else ""
                  for p in prompts]
        for i in ids:
            P.check_room(len(i), params, body, engine.engine.max_model_len)
        rid = P.new_id("cmpl")
        gens = start_sequences(ids, params, best_of, rid, stream)
        if not stream:
            try:
                groups, chosen = await finish_all(request, gens, params, best_of)
            except _ClientGone:
                return Response(status_code=499)
            texts = [e for e in echoed for _ in range(params.n)]  # choice i * n + j is prompt i's sequence j
            return P.completion_response(rid, name, chosen, texts, P.request_usage(groups, chosen), tok, echo,
                                         params.logprobs)

        head = P.StreamHead(rid, "text_completion", name, include_usage)

        async def chunks():
            fan = _FanIn(gens)
            finals = [None] * len(gens)
            unsent = [e for e in echoed for _ in range(params.n)]  # echoed prompts go with a choice's first chunk
            offsets = [len(e) for e in unsent]  # text_offset of each choice's next token
            echo_logprobs = [echo and params.logprobs is not None] * len(gens)  # ... and their logprobs
            try:
                while (item := await fan.next()) is not None:
                    index, out = item
                    if isinstance(out, Exception) or out.error:
                        yield stream_error(request.scope[REQUEST_ID], out)
                        break
                    finals[index] = out if out.finished else None
                    if out.delta_text or out.finished or out.delta_logprobs or unsent[index]:
                        if echo_logprobs[index] and out.delta_logprobs is not None and out.prompt_logprobs is not None:
                            entries, ids = P.echoed(out, out.delta_logprobs)  # the prompt's tokens from offset 0
                            logprobs = P.completion_logprobs(entries, tok, 0, ids, params.logprobs)
                            echo_logprobs[index] = False
                        else:
                            logprobs = P.completion_logprobs(out.delta_logprobs, tok, offsets[index])
                        if logprobs is not None and logprobs["tokens"]:
                            offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                        yield sse(P.completion_chunk(head, index, unsent[index] + out.delta_text, P.finish_reason(out),
                                                     logprobs))
                        unsent[index] = ""
            finally:  # the client went away (or a bug): no await here, the task is being cancelled
                fan.cancel()
            if include_usage and all(finals):
                groups = [finals[i:i + params.n] for i in range(0, len(finals), params.n)]
                yield sse(head.usage_chunk(P.request_usage(groups, finals)))
            yield sse("[DONE]")

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/v1/memory")
    async def memory():
        return await asyncio.to_thread(engine.call, lambda e: e.memory_snapshot())

    @app.post("/v1/memory/limit")
    async def memory_limit(request: Request):
        """{"max_bytes": N}: how far the KV pool may grow; lowering it gives free pages back at once."""
        if not config.api_key and not config.loopback_only:
            raise ApiError(403, "changing the KV limit needs --api-key on a server reachable from other machines "
                                "(bound beyond loopback)")
        body = await read_body(request, {"max_bytes"}, "/v1/memory/limit")
        value = body.get("max_bytes")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ApiError(400, f"max_bytes must be a positive integer, got {P.short(value)}", param="max_bytes")
        total = _device_memory(str(engine.engine.device))
        if value > total:
            raise ApiError(400, f"max_bytes {value} is more than this device's memory ({total} bytes)",
                           param="max_bytes")
        try:
            return await asyncio.to_thread(engine.call, lambda e: e.set_kv_limit(value))
        except ValueError as e:
            raise ApiError(400, str(e), param="max_bytes") from None

    @app.get("/metrics")
    async def metrics():
        stats = await asyncio.to_thread(engine.call, lambda e: e.stats())
        return PlainTextResponse(prometheus(stats, name), media_type="text/plain; version=0.0.4")

    return Guard(app, state)


class _FanIn:
    """The outputs of several sequences' generators as (index, output or exception), in the order
    they come; next() is None once all have ended. cancel() ends what is left (each generator's
    cleanup aborts its sequence)."""

    def __init__(self, gens: list):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.live = len(gens)
        self.tasks = [asyncio.ensure_future(self._pump(i, g)) for i, g in enumerate(gens)]

    async def _pump(self, index: int, gen) -> None:  # owns its generator: cancelling it aborts that sequence
        try:
            async for out in gen:
                self.queue.put_nowait((index, out))
        except Exception as e:  # delivered to the client by the reader
            self.queue.put_nowait((index, e))
        self.queue.put_nowait((index, None))

    async def next(self):
        while self.live:
            index, out = await self.queue.get()
            if out is None:
                self.live -= 1
            else:
                return index, out
        return None

    def cancel(self) -> None:
        for t in self.tasks:
            t.cancel()


def _tool_delta(out: RequestOutput, delta: dict, rest: str, calls: list[dict]) -> tuple[dict, str | None]:
    """The last delta of a streamed choice whose reply was parsed: the content held back, and its
    calls whole, each with its index (OpenAI's chunk shape); and its finish_reason."""
    content = delta.get("content", "") + rest
    _, reason = P.chat_message(out, (content, calls))
    delta = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
    return delta, reason


async def _last(gen: AsyncIterator):
    out = None
    async for out in gen:
        pass
    return out


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (call it once the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _failed(out: RequestOutput) -> ApiError:
    """A sequence the engine ended with an error (the KV cache cannot hold it; a grammar rejected a
    token): a 500 that says why, not a reply cut short with finish_reason "stop"."""
    return ApiError(500, f"the engine could not finish this request: {out.error}")


def _engine_error(e: BaseException) -> ApiError:
    if isinstance(e, EngineDeadError):
        return ApiError(503, f"{e}; restart the server")
    if isinstance(e, ValueError):  # the engine refused the request when adding it
        return ApiError(400, str(e))
    raise e


def _device_memory(device: str) -> int:
    """Total bytes of the device the KV pool lives on (bounds what /v1/memory/limit accepts)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
