"""`glake serve` reliability figures (issue 11) for RESULTS.md: bad inputs by class (statuses, 500s,
dropped keep-alive connections), huge bodies (time to 413, /health latency meanwhile, server RSS),
non-streaming clients that hang up (time until their requests and pages are gone), a soak of
streaming and non-streaming clients with random disconnects (errors, leaked pages, idle pool before
and after), and shutdown under load (SIGTERM with live streams: time to exit, finish reasons).

    PYTHONPATH=. python benchmarks/serve_reliability.py [--seconds 60] [--streaming 64] [--plain 16] \
        [--sections bad_inputs,huge_bodies,plain_disconnects,soak,shutdown] [--json out.json]

PYTHONPATH picks the server code under test: PYTHONPATH=/path/to/older/checkout runs the same clients
against an older server (its bad-input section is the baseline in RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.util
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from report import save_json  # noqa: E402
from serve_helpers import Server, soak  # noqa: E402

KEY = "bench-key"
NUMERIC = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n",
           "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"]
OTHER = ["stop", "stop_token_ids", "stream", "stream_options", "ignore_eos", "skip_special_tokens",
         "include_stop_str_in_output", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format",
         "logit_bias", "user", "model", "echo", "suffix", "best_of"]
BASE = {"/v1/chat/completions": ("messages", [{"role": "user", "content": "Hi"}]), "/v1/completions": ("prompt", "Hi")}


def body(path: str, **fields) -> bytes:
    """A valid request (2 tokens) with fields set to raw JSON text."""
    key, value = BASE[path]
    parts = {key: json.dumps(value), "max_tokens": "2", **fields}
    return ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in parts.items()) + "}").encode("utf-8", "surrogatepass")


def bad_inputs() -> dict[str, list[tuple[str, bytes]]]:
    rng = random.Random(0)
    classes: dict[str, list[tuple[str, bytes]]] = {}
    for path, (key, _) in BASE.items():
        fields = NUMERIC + OTHER + [key]
        for f in NUMERIC:
            classes.setdefault("NaN, +-Infinity", []).extend((path, body(path, **{f: v}))
                                                             for v in ("NaN", "Infinity", "-Infinity"))
            classes.setdefault("huge numbers", []).extend(
                (path, body(path, **{f: v})) for v in (str(2**63), str(-(2**63) - 1), str(10**30), str(10**4000),
                                                       "1" * 5000, "1e400", "-1e400", "1e308"))
        texts = ["model", "stop", "user", key]
        for f in texts:
            for s in ("\\ud800", "x\\udfffy", "\\udc00\\ud800"):
                value = f'[{{"role":"user","content":"{s}"}}]' if f == "messages" else f'"{s}"'
                classes.setdefault("lone surrogates", []).append((path, body(path, **{f: value})))
        for f in fields:
            for n in (100, 5000, 100_000):
                for opener, closer in (("[", "]"), ('{"a":', "}")):
                    inner = "1" if opener != "[" else ""
                    deep = opener * n + inner + closer * n
                    classes.setdefault("deep nesting", []).append((path, body(path, **{f: deep})))
            for v in ("null", "true", "-1", "1.5", '"s"', "[]", "{}", '[1,"a"]', '{"a":1}'):
                if f == "max_tokens" and v == "null":
                    continue  # the default length: a long generation, not a bad input
                classes.setdefault("wrong JSON type", []).append((path, body(path, **{f: v})))
        for extra in ({"no_such_field": "1"}, {"tools": '[{"type":"function"}]'}, {"logprobs": "true"}, {"n": "2"},
                      {"best_of": "3"}, {"echo": "true"}, {"response_format": '{"type":"json_object"}'},
                      {"logit_bias": '{"1":5}'}, {"stream_options": '{"include_usage":true}'}, {"top_k": "100000"},
                      {"stop_token_ids": "[1000000]"}):
            classes.setdefault("unsupported or unknown fields", []).append((path, body(path, **extra)))
        garbage = [b"", b" ", b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe\x00", b'{"a":1,}', b"{'a':1}"]
        garbage += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) for _ in range(20)]
        classes.setdefault("malformed bodies", []).extend((path, g) for g in garbage)
    for v in ("null", "true", "-1", "0", "1.5", '"8GiB"', "[]", "{}", "NaN", "Infinity", str(10**24), "1000"):
        classes.setdefault("memory limit values", []).append(("/v1/memory/limit", f'{{"max_bytes":{v}}}'.encode()))
    return classes


def send_bad_inputs(server: Server) -> dict:
    """Each bad input on one keep-alive connection; a connection the server drops counts and reopens."""
    out, dropped, not_openai = {}, 0, 0
    conn = None
    for name, cases in bad_inputs().items():
        statuses: dict[int, int] = {}
        for path, raw in cases:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                conn.auto_open = 0
                conn.connect()
            try:
                conn.request("POST", path, body=raw, headers={**server.headers, "Content-Type": "application/json"})
                r = conn.getresponse()
                payload = r.read()
                status = r.status
                if status != 200 and not openai_error(payload, status):
                    not_openai += 1
                if r.will_close:
                    dropped += 1
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                status, dropped, conn = "connection lost", dropped + 1, None
            statuses[status] = statuses.get(status, 0) + 1
        out[name] = {"tried": len(cases), "statuses": statuses}
    return {"classes": out, "tried": sum(c["tried"] for c in out.values()),
            "status_500": sum(c["statuses"].get(500, 0) for c in out.values()), "connections_dropped": dropped,
            "errors_not_in_openai_shape": not_openai}


def openai_error(payload: bytes, status: int) -> bool:
    try:
        error = json.loads(payload)["error"]
        return error["code"] == status and isinstance(error["message"], str) and bool(error["type"])
    except (ValueError, KeyError, TypeError):
        return False


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def huge_bodies(server: Server) -> dict:
    """Bodies are built before the probe starts: building 100 MB here would stall the probe's thread."""
    bodies = {mb: b'{"messages": [{"role": "user", "content": "' + b"a" * (mb * 10**6) + b'"}]}' for mb in (20, 100)}
    latencies, failures, stop = [], [], threading.Event()

    def probe():
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.get(server.url + "/health").raise_for_status()
                    latencies.append(time.perf_counter() - t0)
                except Exception as e:  # counted
                    failures.append(repr(e))
                stop.wait(0.02)

    rss_before = rss_mb(server.proc.pid)
    thread = threading.Thread(target=probe)
    thread.start()
    out = {}
    with httpx.Client(headers=server.headers, timeout=300) as c:
        for mb, big in bodies.items():
            for how, content in (("content-length", big),
                                 ("chunked", (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)))):
                t0 = time.perf_counter()
                r = c.post(server.url + "/v1/chat/completions", content=content)
                out[f"{mb} MB {how}"] = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 3)}
        t0 = time.perf_counter()
        r = c.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "the quick brown fox " * 190_000}]})
        out["3.8 MB prompt (under the body limit)"] = {"status": r.status_code,
                                                       "seconds": round(time.perf_counter() - t0, 3)}
    stop.set()
    thread.join()
    return {"bodies": out, "health_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "health_max_ms": round(max(latencies) * 1000, 1), "health_probes": len(latencies),
            "health_failures": len(failures), "rss_mb_before": round(rss_before),
            "rss_mb_after": round(rss_mb(server.proc.pid))}


def plain_disconnects(server: Server, clients: int = 10) -> dict:
    body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}

    def one():
        try:
            httpx.post(server.url + "/v1/completions", json=body, headers=server.headers,
                       timeout=httpx.Timeout(60, read=3))
        except httpx.ReadTimeout:
            pass

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = time.monotonic()
    at_hangup = server.metrics()
    while True:
        m = server.metrics()
        if m["glake_requests_running"] == m["glake_requests_waiting"] == m["glake_kv_pages_requests"] == 0:
            break
        time.sleep(0.01)
    return {"clients": clients, "running_at_hangup": at_hangup["glake_requests_running"],
            "seconds_until_none_running": round(time.monotonic() - t0, 3),
            "tokens_after_hangup": m["glake_generation_tokens_total"] - at_hangup["glake_generation_tokens_total"]}


def idle_pool(server: Server, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        snap = server.get("/v1/memory")
        pages = snap["engine"]["kv_pages"]
        if pages["requests"] == pages["cached"] == pages["free"] == 0 and snap["engine"]["running"] == 0:
            return {"total_pages": snap["pool"]["total_pages"], "kv_pages": pages,
                    "owned_slots": sum(1 for s in snap["slots"] if s["owner"] and not s["internal"])}
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool never went idle: {pages}")
        time.sleep(0.2)


def shutdown_under_load(args, workdir: Path) -> dict:
    server = Server(["--max-model-len", "512", "--max-num-seqs", "32", "--kv-cache-memory", "128MiB",
                     "--shutdown-timeout", str(args.grace)], workdir / "shutdown.log").wait_ready()
    reasons, errors = {}, []

    def stream():
        try:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=300,
                              json={"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True,
                                    "stream": True}) as r:
                last = None
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        last = json.loads(line[6:])["choices"][0]["finish_reason"] or last
                reasons[last] = reasons.get(last, 0) + 1
        except Exception as e:  # counted
            errors.append(repr(e))

    threads = [threading.Thread(target=stream) for _ in range(args.shutdown_streams)]
    for t in threads:
        t.start()
    while server.metrics()["glake_requests_running"] < args.shutdown_streams:
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=args.grace + 120)
    took = time.monotonic() - t0
    for t in threads:
        t.join()
    log = server.log()
    return {"streams": args.shutdown_streams, "grace_s": args.grace, "exit_s": round(took, 2),
            "exit_code": server.proc.returncode, "finish_reasons": reasons, "errors": errors,
            "phases": [line for line in log.splitlines() if line.startswith("glake serve:")],
            "tracebacks": log.count("Traceback")}


def run_soak(server: Server, args) -> dict:
    before = idle_pool(server)
    t0 = time.monotonic()
    tally = asyncio.run(soak(server, args.seconds, args.streaming, args.plain, max_tokens=32))
    out = {"seconds": args.seconds, "streaming": args.streaming, "plain": args.plain,
           "wall_s": round(time.monotonic() - t0, 1), "finished": tally["finished"],
           "disconnected": tally["disconnected"], "errors": len(tally["errors"]),
           "error_samples": [repr(e)[:200] for e in tally["errors"][:5]], "idle_before": before,
           "idle_after": idle_pool(server)}
    out["leaked"] = out["idle_before"] != out["idle_after"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60, help="soak length")
    ap.add_argument("--streaming", type=int, default=64)
    ap.add_argument("--plain", type=int, default=16)
    ap.add_argument("--grace", type=float, default=5.0, help="--shutdown-timeout of the shutdown run")
    ap.add_argument("--shutdown-streams", type=int, default=16)
    ap.add_argument("--sections", default="bad_inputs,huge_bodies,plain_disconnects,soak,shutdown")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"bad_inputs", "huge_bodies", "plain_disconnects", "soak", "shutdown"}
    if unknown:
        ap.error(f"unknown --sections: {sorted(unknown)}")
    def commit(where: Path) -> str:
        return subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()

    server_code = Path(importlib.util.find_spec("glakeserve").origin).parent  # what the server will import
    result = {"server_commit": commit(server_code), "script_commit": commit(Path(__file__).parent),
              "date": time.strftime("%Y-%m-%d"),
              "device": f"{os.cpu_count()}-core CPU ({cpu_name()})"}
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(["--max-model-len", "256", "--max-num-seqs", "32", "--kv-cache-memory", "64MiB",
                         "--kv-max-memory", "96MiB", "--kv-idle-release", "1"], Path(tmp) / "server.log",
                        key=KEY).wait_ready()
        try:
            for section, run in (("bad_inputs", send_bad_inputs), ("huge_bodies", huge_bodies),
                                 ("plain_disconnects", plain_disconnects), ("soak", lambda s: run_soak(s, args))):
                if section in sections:
                    result[section] = run(server)
                    print(json.dumps({section: result[section]}, indent=1), flush=True)
            result["server_log_tracebacks"] = server.log().count("Traceback")
        finally:
            result["exit_code_idle"] = server.stop()
        if "shutdown" in sections:
            result["shutdown"] = shutdown_under_load(args, Path(tmp))
            print(json.dumps({"shutdown": result["shutdown"]}, indent=1), flush=True)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
