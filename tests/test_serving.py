"""`compressor serve`: the bundle over HTTP, answered on 127.0.0.1 by a server the test starts (the real CLI in
a child process) and a real HTTP client (httpx): predictions equal `Bundle.predict`'s, concurrent requests share
batches, and every bad request gets a one-line JSON error with a 4xx code."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from _export_helpers import build_run
from compressor.runtime import Bundle


@pytest.fixture(scope="module")
def bundle_dir():
    return Path(build_run().outputs["bundle"]["bundle"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "compressor.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def server(bundle_dir):
    port = _free_port()
    proc = _cli("serve", str(bundle_dir), "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
                "--batch-wait-ms", "300", "--max-batch", "64")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_health(server):
    r = httpx.get(f"{server}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["tasks"] == ["ner", "rel", "sst", "qa"] and body["format"] == "onnx-int8"


def test_predict_one_text_and_a_list_equal_the_runtime(server, bundle_dir):
    texts = ["Anna Schmidt works for Acme Corp in Oslo .", "Paris is nice ."]
    local = Bundle.load(bundle_dir, threads=1).predict(texts, tasks=["ner", "sst"])
    r = httpx.post(f"{server}/predict", json={"task": ["ner", "sst"], "text": texts})
    assert r.status_code == 200, r.text
    assert r.json()["results"] == json.loads(json.dumps(local))
    r = httpx.post(f"{server}/predict", json={"task": "sst", "text": texts[1]})
    assert r.status_code == 200 and len(r.json()["results"]) == 1
    assert r.json()["results"][0]["predictions"]["sst"]["label"] == local[1]["predictions"]["sst"]["label"]
    r = httpx.post(f"{server}/predict", json={"task": "qa", "text": texts[0], "question": "Where does Anna work ?"})
    assert r.status_code == 200 and "answer" in r.json()["results"][0]["predictions"]["qa"]


def test_concurrent_requests_share_batches(server):
    before = httpx.get(f"{server}/health").json()
    texts = [f"Anna met Bob in city number {i} ." for i in range(12)]

    async def fire():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{server}/predict", json={"task": "ner", "text": t})
                                          for t in texts))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["results"][0]["text"] for r in responses] == texts  # each request gets its own results
    after = httpx.get(f"{server}/health").json()
    assert after["requests"] - before["requests"] == 12
    assert after["batches"] - before["batches"] < 12  # merged: fewer model calls than requests


@pytest.mark.parametrize("body, status, message", [
    (b'{"text": "hello"}', 400, "missing field 'task'"),
    (b'{"task": "pos", "text": "hello"}', 400, "does not serve task(s) 'pos'"),
    (b'{"task": "ner", "text": "   "}', 400, "text 0: empty text"),
    (b'{"task": "ner", "text": []}', 400, "no text given"),
    (b'{"task": "ner", "text": "a" ', 400, "not valid JSON"),
    (b'["ner"]', 400, "expected a JSON object"),
    (b'{"task": "ner", "text": "a", "txt": 1}', 400, "unknown field(s) 'txt'"),
    (b'{"task": "ner", "text": "\\udcff bad"}', 400, "not valid UTF-8"),
    (b'{"task": "qa", "text": "Who ?"}', 400, "give questions"),
])
def test_bad_requests_get_one_line_json_errors(server, body, status, message):
    r = httpx.post(f"{server}/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and message in r.json()["error"] and "\n" not in r.json()["error"]


def test_body_over_the_limit_is_413(server):
    big = json.dumps({"task": "ner", "text": "a " * (5 * 1000 * 1000 + 10)}).encode()
    r = httpx.post(f"{server}/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(11):
            yield b"x" * 1_000_000

    r = httpx.post(f"{server}/predict", content=chunks())
    assert r.status_code == 413


def test_unknown_route_and_method_are_json(server):
    r = httpx.get(f"{server}/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{server}/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_serve_on_a_busy_port_is_one_error_line(bundle_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = _cli("serve", str(bundle_dir), "--port", str(port))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"127.0.0.1:{port}" in err
