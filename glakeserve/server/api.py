"""The HTTP API: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, plus /health,
/metrics (Prometheus) and /v1/memory (what `glake inspect-memory --url` shows)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from glakeserve.server import protocol as P
from glakeserve.server.async_engine import AsyncEngine, EngineDeadError
from glakeserve.server.protocol import ApiError


def build_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="GlakeServe", docs_url=None, redoc_url=None)
    tokenizer = engine.engine.tokenizer
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if api_key and path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                             "authentication_error").body(), status_code=401)
        if engine.dead and path.startswith("/v1/") and request.method == "POST":
            return JSONResponse(ApiError(503, "the engine has failed; restart the server", "service_unavailable")
                                .body(), status_code=503)
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served_model_name:
            raise ApiError(404, f"The model `{model}` does not exist. This server serves `{served_model_name}`.",
                           "not_found_error", "model")
        return body

    def validate(prompt, params) -> list[int]:
        try:
            return engine.validate(prompt, params)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages" if isinstance(prompt, list) else "prompt") from None

    async def wait_final(request: Request, gen: AsyncIterator) -> object:
        """Drains a request's outputs; aborts it if the client goes away meanwhile."""
        task = asyncio.ensure_future(_last(gen))
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await request.is_disconnected():
                task.cancel()
                await gen.aclose()
                raise ApiError(499, "client disconnected")
        try:
            return task.result()
        except EngineDeadError as e:
            raise ApiError(503, f"{e}; restart the server", "service_unavailable") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def sse(payload: dict | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    # ----- endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.dead:
            return JSONResponse({"status": "engine failed"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": started,
                                            "owned_by": "glakeserve", "max_model_len": engine.engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so no chat template; use /v1/completions with token ids")
        messages = P.chat_messages(body)
        params = P.sampling_params(body, default_max_tokens=None)
        try:
            ids = tokenizer.chat_ids(messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = validate(ids, params)
        rid = P.new_id("chatcmpl")
        gen = engine.generate(ids, params, rid, stream=bool(body.get("stream")))
        model = served_model_name
        if not body.get("stream"):
            out = await wait_final(request, gen)
            return P.chat_response(rid, model, out)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def stream():
            yield sse(P.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
            last = None
            try:
                async for out in gen:
                    last = out
                    reason = P.finish_reason(out)
                    if out.delta_text or reason:
                        yield sse(P.chat_chunk(rid, model, {"content": out.delta_text} if out.delta_text else {},
                                               reason))
            except (EngineDeadError, ValueError) as e:
                yield sse(ApiError(503 if isinstance(e, EngineDeadError) else 400, str(e)).body())
            if include_usage and last is not None:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                           "choices": [], "usage": P.usage(last.num_prompt_tokens, last.num_output_tokens)})
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompts = P.completion_prompts(body)
        params = P.sampling_params(body, default_max_tokens=16)
        ids = [validate(p, params) for p in prompts]
        rid = P.new_id("cmpl")
        gens = [engine.generate(i, params, f"{rid}-{n}", stream=bool(body.get("stream"))) for n, i in enumerate(ids)]
        model = served_model_name
        if not body.get("stream"):
            outs = await asyncio.gather(*(wait_final(request, g) for g in gens))
            return P.completion_response(rid, model, list(outs))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def stream():
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(index, gen):
                try:
                    async for out in gen:
                        await queue.put((index, out))
                except Exception as e:  # delivered to the client below
                    await queue.put((index, e))
                await queue.put((index, None))

            tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
            live, prompt_tokens, completion_tokens = len(gens), 0, 0
            try:
                while live:
                    index, out = await queue.get()
                    if out is None:
                        live -= 1
                    elif isinstance(out, Exception):
                        yield sse(ApiError(503 if isinstance(out, EngineDeadError) else 400, str(out)).body())
                    else:
                        if out.finished:
                            prompt_tokens += out.num_prompt_tokens
                            completion_tokens += out.num_output_tokens
                        if out.delta_text or out.finished:
                            yield sse(P.completion_chunk(rid, model, index, out.delta_text, P.finish_reason(out)))
            finally:
                for t in tasks:
                    t.cancel()
                for g in gens:
                    await g.aclose()
            if include_usage:
                yield sse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                           "choices": [], "usage": P.usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/memory")
    async def memory():
        return await asyncio.to_thread(engine.call, lambda e: e.memory_snapshot())

    @app.post("/v1/memory/limit")
    async def memory_limit(request: Request):
        """{"max_bytes": N}: how far the KV pool may grow; lowering it gives free pages back at once."""
        body = await read_body(request)
        value = body.get("max_bytes")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ApiError(400, f"max_bytes must be a positive integer, got {value!r}", param="max_bytes")
        try:
            return await asyncio.to_thread(engine.call, lambda e: e.set_kv_limit(value))
        except ValueError as e:
            raise ApiError(400, str(e), param="max_bytes") from None

    @app.get("/metrics")
    async def metrics():
        stats = await asyncio.to_thread(engine.call, lambda e: e.stats())
        return PlainTextResponse(prometheus(stats, served_model_name), media_type="text/plain; version=0.0.4")

    return app


async def _last(gen: AsyncIterator):
    out = None
    async for out in gen:
        pass
    return out


def prometheus(stats: dict, model: str) -> str:
    pool = stats["pool"]
    owned = [s for s in stats["slots"] if s["owner"] and not s.get("internal")]
    rows = [
        ("glake_requests_running", "gauge", "Requests being generated", stats["running"]),
        ("glake_requests_waiting", "gauge", "Requests queued", stats["waiting"]),
        ("glake_kv_pages_mapped", "gauge", "Physical KV pages in use", pool["used_pages"]),
        ("glake_kv_pages_reserved", "gauge", "Virtual KV pages reserved by running requests' slots",
         sum(s["reserved_pages"] for s in owned)),
        ("glake_kv_pool_pages", "gauge", "Physical pages in the pool", pool["total_pages"]),
        ("glake_kv_pool_free_pages", "gauge", "Free physical pages", pool["free_pages"]),
        ("glake_kv_pool_usage", "gauge", "Fraction of the pool in use",
         pool["used_pages"] / pool["total_pages"] if pool["total_pages"] else 0.0),
        ("glake_preemptions_total", "counter", "Requests preempted (recomputed later)", stats["preemptions"]),
        ("glake_mapping_waits_total", "counter", "Times a step waited on the mapping worker", stats["mapping_waits"]),
        ("glake_prompt_tokens_total", "counter", "Prompt tokens processed", stats["prompt_tokens"]),
        ("glake_generation_tokens_total", "counter", "Tokens generated", stats["generation_tokens"]),
        ("glake_requests_finished_total", "counter", "Requests finished", stats["finished"]),
    ]
    if stats.get("prefix_cache"):
        pc = stats["prefix_cache"]
        rows += [
            ("glake_prefix_cache_pages", "gauge", "KV pages held by the prefix cache", pc["cached_pages"]),
            ("glake_prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache", pc["lookups"]),
            ("glake_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache",
             pc["hit_tokens"]),
            ("glake_prefix_cache_evicted_total", "counter", "Prefix-cache entries evicted", pc["evicted"]),
        ]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f'{name}{{model="{model}"}} {value}']
    return "\n".join(lines) + "\n"
