"""`glake serve` with the official openai client as a real client: chat and completions, streaming
and not, 32 concurrent streams, bad parameters, a client that disconnects mid-stream; afterwards no
page is held by a request. Also /metrics, and `inspect-memory --json --url` against it."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import httpx
import openai
import pytest
from openai import OpenAI

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir):
    port = free_port()
    glake = os.path.join(os.path.dirname(sys.executable), "glake")
    proc = subprocess.Popen([glake, "serve", "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "32",
                             "--kv-cache-memory", "128MiB", "--kv-max-memory", "160MiB", "--kv-idle-release", "2",
                             "--api-key", KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stdout.read())
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def memory(server) -> dict:
    req = urllib.request.Request(server + "/v1/memory", headers={"Authorization": f"Bearer {KEY}"})
    return json.loads(urllib.request.urlopen(req).read())


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert urllib.request.urlopen(server + "/health").status == 200


def test_chat_and_completions(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of "
                                                                                          "France?"}],
                                       temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 6
    multi = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], max_tokens=3, temperature=0)
    assert [ch.index for ch in multi.choices] == [0, 1]


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name two fruits."}], temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    text = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8,
                                                                         temperature=0, stream=True))
    assert text == client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0).choices[0].text


def test_32_concurrent_streams(client, server):
    results, errors = {}, []

    def one(i):
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}], temperature=0.7, seed=i,
                max_tokens=12, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream)
        except Exception as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 32 and all(results.values())
    metrics = httpx.get(server + "/metrics").text
    assert "glake_generation_tokens_total" in metrics and "glake_kv_pool_usage" in metrics
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    pc = memory(server)["engine"]["prefix_cache"]
    assert values["glake_prefix_cache_lookups_total"] == pc["lookups"] >= 32  # each prompt looked up once at least
    assert values["glake_prefix_cache_hit_tokens_total"] == pc["hit_tokens"]


def test_bad_requests_get_openai_errors(client, server):
    msgs = [{"role": "user", "content": "hi"}]
    for bad, field in ((dict(temperature=-1), "temperature"), (dict(top_p=3), "top_p"), (dict(max_tokens=0),
                                                                                        "max_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=msgs, **bad)
        assert field in e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_model_len is 512"):
        client.completions.create(model=MODEL, prompt="word " * 700, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be an integer in"):
        client.chat.completions.create(model=MODEL, messages=msgs, logprobs=True, top_logprobs=50)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist"):
        client.chat.completions.create(model="gpt-4", messages=msgs)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the request body is not valid JSON")
    # the server still serves
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_aborts_and_frees_pages(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 400,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 6:
                break  # hang up mid-stream
    for _ in range(100):
        snap = memory(server)
        if snap["engine"]["running"] == 0 and snap["engine"]["waiting"] == 0:
            break
        time.sleep(0.1)
    assert snap["engine"]["running"] == 0, snap["engine"]
    assert snap["engine"]["generation_tokens"] >= 1


def test_afterwards_no_page_is_held_by_a_request(server):
    snap = memory(server)
    requests = [s for s in snap["slots"] if not s["internal"]]
    assert all(s["owner"] is None for s in requests)
    # physical pages still in use belong to idle slots (kept for reuse, reclaimable), the prefix
    # cache, or the anchor slot; none to a request
    held = {}
    for vt in snap["vtensors"]:
        for page in vt["physical_pages"]:
            held.setdefault(page, []).append(vt["name"])
    pool = snap["pool"]
    assert pool["used_pages"] == len(held)
    assert pool["free_pages"] + len(held) == pool["total_pages"]


def test_idle_release_and_the_limit_endpoint(server):
    for _ in range(60):  # --kv-idle-release 2: free pages go back once the server idles
        snap = memory(server)
        if snap["pool"]["pages_released"] > 0:
            break
        time.sleep(0.25)
    assert snap["pool"]["pages_released"] > 0 and snap["pool"]["free_pages"] == 0
    glake = os.path.join(os.path.dirname(sys.executable), "glake")
    out = subprocess.run([glake, "inspect-memory", "--url", server, "--api-key", KEY, "--set-limit", "96MiB"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "KV pool limit: 0.09 GiB" in out.stdout, out.stdout + out.stderr
    assert memory(server)["engine"]["kv_max_pages"] * memory(server)["pool"]["page_size"] <= 96 << 20
    r = httpx.post(server + "/v1/memory/limit", json={"max_bytes": 1000}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "cannot hold one request" in r.json()["error"]["message"]
    refused = subprocess.run([glake, "inspect-memory", "--url", server, "--api-key", KEY, "--set-limit", "1KiB"],
                             capture_output=True, text=True, timeout=60)
    message = " ".join(refused.stderr.split())  # rich wraps long lines
    assert refused.returncode == 2 and "the server refused the limit" in message, refused.stderr
    assert "cannot hold one request" in message
    r = httpx.post(server + "/v1/memory/limit", json={"max_bytes": "lots"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "max_bytes must be a positive integer" in r.json()["error"]["message"]
    # under the new limit the pool grows back as requests come, and they all succeed
    client = OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    outs = [client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=20, temperature=0)
            for i in range(4)]
    assert all(o.usage.completion_tokens == 20 for o in outs)


def test_inspect_memory_json_against_the_server(server):
    glake = os.path.join(os.path.dirname(sys.executable), "glake")
    out = subprocess.run([glake, "inspect-memory", "--url", server, "--api-key", KEY, "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    live = memory(server)  # the pool itself may shrink in between (idle release after 2 s): compare what stays
    assert snap["pool"]["page_size"] == live["pool"]["page_size"]
    assert snap["engine"]["kv_max_pages"] == live["engine"]["kv_max_pages"]
    assert len(snap["slots"]) == len(live["slots"])
    assert snap["engine"]["model"] == MODEL
    bad = subprocess.run([glake, "inspect-memory", "--url", "http://127.0.0.1:1", "--json"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "cannot reach a glake server" in bad.stderr
