"""`glake serve` under what a load balancer sends it (issue 11): clients that hang up, non-streaming
or not; a fuzzed request schema; bodies far over the limit; errors on a keep-alive connection; a
soak of streaming and non-streaming clients with random disconnects. Everything talks to 127.0.0.1
and is bounded in time."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import shutil
import statistics
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glakeserve.server.middleware import bearer_token, key_matches
from helpers import save_tiny_hf_llama
from serve_helpers import InProcess, Server, soak, sse_events

KEY = "reliability-key"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(["--max-model-len", "256", "--max-num-seqs", "32", "--kv-cache-memory", "64MiB",
                "--kv-max-memory", "96MiB", "--kv-idle-release", "1"],
               tmp_path_factory.mktemp("serve") / "server.log", key=KEY).wait_ready()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as c:
        yield c


def wait_idle(server: Server, timeout: float = 60) -> dict:
    """Metrics once no request runs or waits and none holds a page (fails after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["glake_requests_running"] == m["glake_requests_waiting"] == m["glake_kv_pages_requests"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still held after {timeout} s: {m}"
        time.sleep(0.05)


def assert_log_clean(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log and "aclose" not in log, log[-3000:]


# ----- defect 1: a non-streaming client that hangs up -------------------------------------------
def test_non_streaming_clients_that_disconnect_are_aborted(server):
    wait_idle(server)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    outcomes = []

    def client():
        try:
            r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers,
                           timeout=httpx.Timeout(60, read=1.5))
            outcomes.append(r.status_code)
        except httpx.ReadTimeout:  # httpx closes the connection: the client is gone
            outcomes.append("gone")

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert outcomes == ["gone"] * 10
    at_hangup = server.metrics()["glake_generation_tokens_total"]
    after = wait_idle(server, timeout=30)
    # each was aborted within a few steps of its client leaving, not run on to max_tokens (10 x 200)
    assert after["glake_generation_tokens_total"] - at_hangup <= 10 * 8
    assert after["glake_kv_pages_requests"] == 0 and after["glake_kv_pool_usage"] == 0


# ----- defect 3: a property-based fuzz of the request schema ------------------------------------
class Raw(str):
    """JSON text that goes into the body as is (NaN, deep nesting, numbers Python would not write)."""


def to_json(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # ascii: a lone surrogate becomes its \ud800 escape; nan -> NaN


nasty = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), 2**63, 2**64, -(2**63) - 1, 10**30, 10**4000, 1e308, -0.0, 5e-324,
    "\ud800", "\udfff", "a\ud83db", "", "\x00", "é" * 3, Raw("1" * 5000), Raw("1e400"), Raw("-1e400"),
])
deep = st.integers(50, 20000).flatmap(lambda n: st.sampled_from([Raw("[" * n + "]" * n),
                                                                 Raw('{"a":' * n + "1" + "}" * n)]))
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | nasty
anything = st.recursive(
    scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6
) | deep


def _counts_as_long(v) -> bool:  # a valid max_tokens above 4 (or none: the default) would make a long generation
    if v is None:
        return True
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return False
    return v == int(v) and 4 < v < 2**63


lengths = st.integers(1, 4) | anything.filter(lambda v: not _counts_as_long(v))
text = st.text(max_size=30)
VALID = {  # every field with a value the server accepts (max_tokens small: each generation is short)
    "model": st.just(MODEL), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1), "seed": st.integers(0, 2**63 - 1), "n": st.just(1),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "min_tokens": st.integers(0, 1), "stop": text.filter(bool) | st.lists(text.filter(bool), max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3), "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(), "stream": st.booleans(),
    "user": text, "logprobs": st.just(False), "response_format": st.just({"type": "text"}), "logit_bias": st.just({}),
    "max_completion_tokens": st.integers(1, 4),
}
messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "developer"]),
    "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1, max_size=2),
}), min_size=1, max_size=3)
prompt = text.filter(bool) | st.lists(st.integers(0, 49151), min_size=1, max_size=6) | st.lists(text.filter(bool),
                                                                                                min_size=1, max_size=2)
ENDPOINTS = {"/v1/chat/completions": ("messages", messages), "/v1/completions": ("prompt", prompt)}
MUTABLE = sorted({*VALID, "messages", "prompt", "max_tokens", "stream_options", "top_logprobs", "tools",
                  "tool_choice", "echo", "suffix", "best_of", "no_such_field"})


@st.composite
def cases(draw):
    """A valid request with up to three fields (or the whole body, or its messages' parts) replaced by
    values of any JSON type: null, booleans, numbers (NaN, +-Infinity, huge), strings (lone surrogates),
    arrays, objects, deep nesting. max_tokens keeps a value that cannot start a long generation."""
    kind = draw(st.sampled_from([*ENDPOINTS, "/v1/memory/limit", "garbage"]))
    if kind == "garbage":
        path = draw(st.sampled_from(sorted(ENDPOINTS)))
        return path, draw(anything | st.binary(max_size=40).map(lambda b: Raw(b.decode("latin-1"))))
    if kind == "/v1/memory/limit":
        return kind, {"max_bytes": draw(anything.filter(lambda v: not (type(v) is int and v > 0)))}
    key, values = ENDPOINTS[kind]
    body = {key: draw(values), "max_tokens": draw(st.integers(1, 4))}
    body.update(draw(st.fixed_dictionaries({}, optional=VALID)))
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    for field in draw(st.lists(st.sampled_from(MUTABLE), max_size=3, unique=True)):
        body[field] = draw(lengths if field in ("max_tokens", "max_completion_tokens") else anything)
    if key == "messages" and isinstance(body["messages"], list) and body["messages"] and draw(st.booleans()):
        part = draw(st.sampled_from(["role", "content"]))
        body["messages"][0] = {**body["messages"][0], part: draw(anything)}
    return kind, body


seen: dict[int, int] = {}


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=cases())
def test_fuzzed_requests_get_openai_errors_never_500(api, case):
    path, body = case
    raw = to_json(body).encode("utf-8", "surrogatepass")
    r = api.post(path, content=raw, headers={"content-type": "application/json"})
    seen[r.status_code] = seen.get(r.status_code, 0) + 1
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:500], raw[:300])
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["code"] == r.status_code and error["type"] and isinstance(error["message"], str)
        assert len(error["message"]) < 2000
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-500:]
    elif path != "/v1/memory/limit":
        assert r.json()["choices"]


def test_after_the_fuzz_the_server_is_healthy(server, api):
    print(f"fuzz: responses by status {seen}")
    assert seen.get(200) and seen.get(400), seen  # the fuzz reached both the engine and the checks
    assert api.get("/health").json() == {"status": "ok"}
    r = api.post("/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    wait_idle(server)
    assert_log_clean(server)


def test_errors_keep_the_keep_alive_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.auto_open = 0  # a connection the server dropped raises instead of reconnecting
    conn.connect()
    auth = {"Authorization": f"bearer {KEY}", "Content-Type": "application/json"}  # scheme in lower case
    cases = [("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": NaN}', 400),
             ("POST", "/v1/completions", b'{"prompt": "hi", "n": Infinity}', 400),
             ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
             ("POST", "/v1/completions", b'{"prompt": "hi", "model": "\\ud800"}', 404),
             ("POST", "/v1/completions", b'{"prompt": "hi", "stream_options": "x"}', 400),
             ("POST", "/v1/completions", b"[" * 50000 + b"]" * 50000, 400),
             ("GET", "/v1/nothing-here", None, 404),
             ("DELETE", "/health", None, 405),
             ("POST", "/v1/completions", b'{"prompt": "' + b"a" * (4 << 20) + b'"}', 413),
             ("POST", "/v1/completions", b'{"prompt": "Hello", "max_tokens": 2}', 200)]
    for method, path, body, status in cases:
        conn.request(method, path, body=body, headers=auth)
        r = conn.getresponse()
        payload = json.loads(r.read())
        assert r.status == status, (path, body[:80] if body else None, payload)
        assert not r.will_close, path
        if status != 200:
            assert payload["error"]["code"] == status and payload["error"]["message"]
    conn.close()


# ----- defect 2: huge bodies --------------------------------------------------------------------
class HealthProbe:
    """GET /health every 20 ms on a connection of its own; records each answer's latency."""

    def __init__(self, url: str):
        self.url, self.latencies, self.failures = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self):
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    assert c.get(self.url + "/health").status_code == 200
                    self.latencies.append(time.perf_counter() - t0)
                except Exception as e:  # collected for the assertion
                    self.failures.append(repr(e))
                self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


def test_huge_bodies_get_413_at_once_while_health_answers(server):
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * 20_000_000 + b'"}]}'
    timings = {}
    with HealthProbe(server.url) as probe, httpx.Client(headers=server.headers, timeout=30) as c:
        time.sleep(0.3)
        for name, content in (("content-length", big),
                              ("chunked", (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)))):
            t0 = time.perf_counter()
            r = c.post(server.url + "/v1/chat/completions", content=content)
            timings[name] = time.perf_counter() - t0
            assert r.status_code == 413, r.text[:300]
            assert r.json()["error"]["code"] == 413 and "--max-body-size" in r.json()["error"]["message"]
        # under the body limit but far over max_model_len: refused having tokenized at most its head
        t0 = time.perf_counter()
        r = c.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "the quick brown fox " * 150_000}]})
        timings["3MB prompt"] = time.perf_counter() - t0
        assert r.status_code == 400 and "max_model_len is 256" in r.json()["error"]["message"]
        time.sleep(0.3)
    print(f"413/400 answered in {timings}; /health p50 {statistics.median(probe.latencies) * 1000:.1f} ms, "
          f"max {max(probe.latencies) * 1000:.1f} ms over {len(probe.latencies)} probes")
    assert not probe.failures, probe.failures
    assert timings["content-length"] < 1.0 and timings["chunked"] < 1.0 and timings["3MB prompt"] < 1.0, timings
    assert statistics.median(probe.latencies) < 0.1 and max(probe.latencies) < 1.0


# ----- defects 6 and 7: keys, the limit endpoint, metrics ---------------------------------------
def test_bearer_parsing_and_constant_time_compare():
    assert bearer_token("Bearer abc") == bearer_token("bearer abc") == bearer_token("BEARER  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None
    assert key_matches("abc", "abc") and not key_matches("abd", "abc") and not key_matches(None, "abc")
    assert key_matches("cl\u00c3\u00a9", "cl\u00e9")  # a UTF-8 key arrives as latin-1 text


def test_keys_and_the_limit_endpoint(server, api):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "invalid_token" in r.headers["www-authenticate"]
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"BEARER {KEY}"}).status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200  # open, as in vLLM
    assert httpx.post(server.url + "/v1/memory/limit", json={"max_bytes": 1 << 30}).status_code == 401
    r = api.post("/v1/memory/limit", json={"max_bytes": 10**24})
    assert r.status_code == 400 and "more than this device's memory" in r.json()["error"]["message"]


def test_limit_endpoint_refused_beyond_loopback_without_a_key():
    from starlette.testclient import TestClient

    from glakeserve.server.api import ServerConfig, build_app

    model = SimpleNamespace(tokenizer=None, max_model_len=64, model_config=SimpleNamespace(vocab_size=100),
                            device="cpu")
    engine = SimpleNamespace(engine=model, dead=None, num_requests=0)
    for loopback, status in ((False, 403), (True, 400)):
        app = build_app(engine, ServerConfig(served_model_name="m", loopback_only=loopback))
        r = TestClient(app).post("/v1/memory/limit", json={"max_bytes": "x"})
        assert r.status_code == status and r.json()["error"]["code"] == status
        app.state.close()


def test_a_bug_is_a_500_in_openai_shape_logged_once_with_its_request_id(capsys):
    from starlette.testclient import TestClient

    from glakeserve.server.api import ServerConfig, build_app

    def broken_call(fn):
        raise RuntimeError("a bug in the stats")

    model = SimpleNamespace(tokenizer=None, max_model_len=64, model_config=SimpleNamespace(vocab_size=100),
                            device="cpu")
    engine = SimpleNamespace(engine=model, dead=None, num_requests=0, call=broken_call)
    app = build_app(engine, ServerConfig(served_model_name="m"))
    r = TestClient(app, raise_server_exceptions=False).get("/metrics")
    rid = r.headers["x-request-id"]
    assert r.status_code == 500 and r.json()["error"]["code"] == 500 and rid in r.json()["error"]["message"]
    log = capsys.readouterr().err
    assert log.count("internal error in request") == 1 and f"request {rid} (GET /metrics)" in log
    assert "RuntimeError: a bug in the stats" in log
    app.state.close()


# ----- a request the engine fails mid-stream ----------------------------------------------------
@pytest.fixture(scope="module")
def in_process(tmp_path_factory, smollm2_dir):
    path = save_tiny_hf_llama(tmp_path_factory.mktemp("tiny"), vocab=49152, hidden=64, layers=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # SmolLM2's, for chat
        shutil.copy(smollm2_dir / f, path / f)
    s = InProcess(path, max_model_len=256, max_num_seqs=8, kv_cache_memory=16 << 20)
    yield s
    s.close()


def fail_sequences(monkeypatch, engine, seed: int, after: int) -> None:
    """The engine ends each sequence sampled with `seed` with an error once it has `after` tokens, as
    it ends one whose grammar rejected a token."""
    scheduler, update = engine.scheduler, engine.scheduler.update

    def failing_update(batch, *args):
        got = update(batch, *args)
        for req in got:
            if req.params.seed == seed and len(req.output_token_ids) == after and not req.finished:
                scheduler.finish(req, "abort", error="injected failure")
        return got

    monkeypatch.setattr(scheduler, "update", failing_update)


def test_an_engine_error_mid_stream_ends_that_stream_with_an_error_event(in_process, monkeypatch):
    """vLLM's shape: the tokens so far, `data: {"error": {...}}`, `data: [DONE]` (no finish_reason, no
    usage); a request beside it is served to its end, and a non-streamed one that fails is a 500."""
    fail_sequences(monkeypatch, in_process.llm.engine, seed=13, after=3)
    common = {"max_tokens": 30, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chat = {**common, "messages": [{"role": "user", "content": "Count to ten"}]}
    text = {**common, "prompt": "Once upon a time"}
    responses = in_process.post(("/v1/chat/completions", {**chat, "seed": 13}),
                                ("/v1/chat/completions", {**chat, "seed": 1}),
                                ("/v1/completions", {**text, "seed": 13}), ("/v1/completions", {**text, "seed": 1}),
                                ("/v1/completions", {**text, "seed": 13, "stream": False, "stream_options": None}))
    assert [r.status_code for r in responses] == [200] * 4 + [500]
    for failed, served in (responses[:2], responses[2:4]):
        events = sse_events(failed.text)
        assert events[-2:] == [{"error": {"message": "the engine could not finish this request: injected failure",
                                          "type": "internal_error", "param": None, "code": 500}}, "[DONE]"], events
        chunks = events[:-2]
        assert chunks and not any(c["choices"][0]["finish_reason"] or c.get("usage") for c in chunks), chunks
        events = sse_events(served.text)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 30, events[-3:]
        assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert "injected failure" in responses[4].json()["error"]["message"]
    assert in_process.engine.dead is None and in_process.engine.num_requests == 0


def test_metrics_split_pages_by_holder(server, api):
    assert api.post("/v1/completions", json={"prompt": "A long story: " * 20, "max_tokens": 4}).status_code == 200
    m = wait_idle(server)
    total = m["glake_kv_pool_pages"]
    assert m["glake_kv_pages_requests"] + m["glake_kv_pages_cached"] + m["glake_kv_pages_free"] <= total
    assert m["glake_kv_pool_usage"] == m["glake_kv_pages_requests"] / total == 0  # idle: cached pages are not usage


# ----- the soak ---------------------------------------------------------------------------------
def idle_pool(server: Server, timeout: float = 60) -> dict:
    """The pool once idle release has run (--kv-idle-release 1): nothing cached, nothing free."""
    deadline = time.monotonic() + timeout
    while True:
        snap = server.get("/v1/memory")
        pages = snap["engine"]["kv_pages"]
        if pages["requests"] == pages["cached"] == pages["free"] == 0 and snap["engine"]["running"] == 0:
            return {"pool": {k: snap["pool"][k] for k in ("total_pages", "used_pages", "free_pages")},
                    "kv_pages": pages,
                    "owned_slots": [s["slot"] for s in snap["slots"] if s["owner"] and not s["internal"]]}
        assert time.monotonic() < deadline, f"the pool never went idle: {pages}"
        time.sleep(0.2)


def test_soak_streaming_and_plain_clients_with_random_disconnects(server):
    before = idle_pool(server)
    tally = asyncio.run(soak(server, seconds=8, streaming=64, plain=16))
    print(f"soak: {tally['finished']} finished, {tally['disconnected']} disconnected, {len(tally['errors'])} errors")
    assert not tally["errors"], tally["errors"][:5]
    assert tally["finished"] > 20 and tally["disconnected"] > 5
    wait_idle(server)
    assert idle_pool(server) == before  # no page leaked, no slot left owned
    assert_log_clean(server)
