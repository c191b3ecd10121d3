"""What `lmforge serve` refuses and how it copes: every bad request of the issue gets a 4xx with a clear
one-line message (and the server goes on serving), a full queue answers 429 with Retry-After, the
deadline answers 504, a client that disconnects cancels its own work only, the API key guards every
route, /healthz follows the engine's loop, and SIGTERM lets a running stream finish."""
from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmforge.serve.app import build_app, build_engines
from lmforge.serve.config import EngineOptions, Limits
from lmforge.serve.metrics import Metrics

from serve_helpers import Server, make_bert, make_gpt, metric, post, request, wait_for

ROOT = Path(__file__).resolve().parents[1]
LONG = {"max_tokens": 2500, "ignore_eos": True}  # a request that runs for seconds (never ended early by eos)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_limits")
    return {"gpt": make_gpt(d / "gpt"), "bert": make_bert(d / "bert"),
            "rope": make_gpt(d / "rope", position="rope", seed=1)}


def _server(paths, names=("gpt", "bert"), *, options=EngineOptions(max_batch=4), api_key=None, **limits) -> Server:
    limits = Limits(**{"max_body_bytes": 20_000, "max_tokens": 200, "max_n": 4, "max_inputs": 8, **limits})
    metrics = Metrics()
    engines = build_engines([f"{n}={paths[n]}" for n in names], options=options, limits=limits, metrics=metrics)
    return Server(build_app(engines, limits=limits, metrics=metrics, api_key=api_key, health_timeout_s=1.0))


@pytest.fixture(scope="module")
def server(paths):
    srv = _server(paths)
    yield srv
    srv.stop()


def _slow(engine, seconds: float = 0.01):
    """Make each decoding step of `engine` take a little longer (the tiny test model is too fast to catch
    a request while it runs); returns the undo."""
    step = engine.batch.step

    def slow_step(drop=()):
        time.sleep(seconds)
        return step(drop)

    engine.batch.step = slow_step
    return lambda: setattr(engine.batch, "step", step)


# ---- bad requests ---------------------------------------------------------------------------------------
C = "/v1/completions"
BAD = [
    # (case, path, raw body or dict, status, what the message says)
    ("malformed JSON", C, b'{"model": "gpt", "prompt": ', 400, "malformed JSON: Expecting value at line 1 column 28"),
    ("not an object", C, b"[1, 2]", 400, "must be a JSON object, got list"),
    ("empty body", C, b"", 400, "request body is empty"),
    ("invalid UTF-8", C, b'{"model": "gpt", "prompt": "caf\xe9"}', 400, "not valid UTF-8: byte 0xe9 at position 31"),
    ("lone surrogate", C, b'{"model": "gpt", "prompt": "\\ud800"}', 400, "prompt: contains an unpaired surrogate"),
    ("oversized body", C, {"model": "gpt", "prompt": "x" * 30_000}, 413, "exceeds the limit of 20000 bytes"),
    ("missing prompt", C, {"model": "gpt"}, 400, "missing required field 'prompt'"),
    ("unknown field", C, {"model": "gpt", "prompt": "a", "max_token": 5}, 400,
     "unknown field 'max_token' (did you mean 'max_tokens'?)"),
    ("prompt wrong type", C, {"model": "gpt", "prompt": 5}, 400, "prompt must be a string, a list of strings"),
    ("max_tokens wrong type", C, {"model": "gpt", "prompt": "a", "max_tokens": "ten"}, 400,
     "max_tokens: input should be a valid integer"),
    ("max_tokens float", C, {"model": "gpt", "prompt": "a", "max_tokens": 2.5}, 400, "max_tokens: input should be"),
    ("temperature wrong type", C, {"model": "gpt", "prompt": "a", "temperature": "hot"}, 400, "temperature:"),
    ("stream wrong type", C, {"model": "gpt", "prompt": "a", "stream": "yes"}, 400, "stream: input should be a valid boolean"),
    ("empty prompt list", C, {"model": "gpt", "prompt": []}, 400, "prompt is an empty list"),
    ("empty token prompt", C, {"model": "gpt", "prompt": [[]]}, 400, "a token-id prompt is an empty list"),
    ("token out of vocab", C, {"model": "gpt", "prompt": [5, 99999]}, 400, "token id 99999 is outside the vocabulary"),
    ("negative max_tokens", C, {"model": "gpt", "prompt": "a", "max_tokens": -5}, 400, "max_tokens must be at least 1, got -5"),
    ("zero max_tokens", C, {"model": "gpt", "prompt": "a", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("huge max_tokens", C, {"model": "gpt", "prompt": "a", "max_tokens": 10 ** 12}, 400,
     "max_tokens 1000000000000 exceeds the limit of 200 (limits.max_tokens)"),
    ("n over the limit", C, {"model": "gpt", "prompt": "a", "n": 5}, 400, "n 5 exceeds the limit of 4 (limits.max_n)"),
    ("n zero", C, {"model": "gpt", "prompt": "a", "n": 0}, 400, "n must be at least 1"),
    ("too many prompts", C, {"model": "gpt", "prompt": ["a"] * 9}, 400, "the limit is 8 (limits.max_inputs)"),
    ("prompt beyond context", C, {"model": "gpt", "prompt": "the quick brown fox " * 40, "max_tokens": 10}, 400,
     "exceeds model 'gpt''s context of 128 tokens"),
    ("context with max_tokens", C, {"model": "gpt", "prompt": "a", "max_tokens": 150}, 400,
     "lower max_tokens to 127"),
    ("temperature range", C, {"model": "gpt", "prompt": "a", "temperature": 3}, 400, "temperature must be in [0, 2]"),
    ("top_p range", C, {"model": "gpt", "prompt": "a", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("logprobs range", C, {"model": "gpt", "prompt": "a", "logprobs": 9}, 400, "logprobs must be in [0, 5]"),
    ("too many stops", C, {"model": "gpt", "prompt": "a", "stop": list("abcde")}, 400, "stop takes at most 4"),
    ("empty stop", C, {"model": "gpt", "prompt": "a", "stop": [""]}, 400, "stop takes at most 4 non-empty strings"),
    ("echo", C, {"model": "gpt", "prompt": "a", "echo": True}, 400, "echo is not supported"),
    ("presence penalty", C, {"model": "gpt", "prompt": "a", "presence_penalty": 0.5}, 400,
     "presence_penalty is not supported (use repetition_penalty)"),
    ("negative seed", C, {"model": "gpt", "prompt": "a", "seed": -1}, 400, "seed must be a non-negative"),
    ("unknown model", C, {"model": "gtp", "prompt": "a"}, 404, "model 'gtp' is not loaded (did you mean 'gpt'?); loaded: gpt, bert"),
    ("model omitted, none able", "/v1/classify", {"inputs": ["a"]}, 400, "no loaded model can classify (loaded: gpt, bert)"),
    ("encoder cannot complete", C, {"model": "bert", "prompt": "a"}, 400,
     "model 'bert' cannot generate completions: it is a bert model (it can: embeddings, fill-mask, attention)"),
    ("gpt cannot embed", "/v1/embeddings", {"model": "gpt", "input": "a"}, 400, "model 'gpt' cannot embed"),
    ("gpt cannot fill masks", "/v1/fill-mask", {"model": "gpt", "inputs": "a [MASK]"}, 400, "model 'gpt' cannot fill masks"),
    ("base model cannot classify", "/v1/classify", {"model": "bert", "inputs": ["good"]}, 400, "model 'bert' cannot classify"),
    ("base model cannot tag", "/v1/tag", {"model": "gpt", "inputs": ["Alice"]}, 400, "model 'gpt' cannot tag"),
    ("base model cannot answer", "/v1/qa", {"model": "bert", "inputs": [{"question": "q", "context": "c"}]}, 400,
     "model 'bert' cannot answer questions"),
    ("empty embedding input", "/v1/embeddings", {"model": "bert", "input": ""}, 400, "input is empty"),
    ("blank text in a list", "/v1/fill-mask", {"model": "bert", "inputs": ["a [MASK]", "  "]}, 400, "inputs[1] is empty"),
    ("empty embedding list", "/v1/embeddings", {"model": "bert", "input": []}, 400, "input is an empty list"),
    ("token-id embedding input", "/v1/embeddings", {"model": "bert", "input": [1, 2]}, 400, "token-id input is not supported"),
    ("bad encoding_format", "/v1/embeddings", {"model": "bert", "input": "a", "encoding_format": "hex"}, 400,
     "encoding_format: input should be 'float' or 'base64'"),
    ("dimensions", "/v1/embeddings", {"model": "bert", "input": "a", "dimensions": 8}, 400,
     "dimensions 8: model 'bert' gives 32-dimensional embeddings"),
    ("no [MASK]", "/v1/fill-mask", {"model": "bert", "inputs": ["no mask here"]}, 400, "holds no [MASK] token"),
    ("fill-mask top_k", "/v1/fill-mask", {"model": "bert", "inputs": ["a [MASK]"], "top_k": 0}, 400, "top_k must be in [1, 100]"),
    ("fill-mask too long", "/v1/fill-mask", {"model": "bert", "inputs": ["the [MASK] " + "cat " * 80]}, 400,
     "the model takes at most 64"),
    ("attention layer", "/v1/attention", {"model": "gpt", "text": "the cat", "layer": 7}, 400, "layer 7 out of range"),
    ("attention empty text", "/v1/attention", {"model": "gpt", "text": " "}, 400, "text is empty"),
]


@pytest.mark.parametrize("case,path,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_clear_4xx(server, case, path, body, status, message):
    code, headers, raw = request(server.port, "POST", path, body)
    assert code == status, raw
    error = json.loads(raw)["error"]
    assert message in error["message"], error["message"]
    assert "\n" not in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_the_server_keeps_serving_after_bad_requests(server):
    for _, path, body, _, _ in BAD[:10]:
        request(server.port, "POST", path, body)
    status, r = post(server.port, C, {"model": "gpt", "prompt": "hello", "max_tokens": 5})
    assert status == 200 and r["choices"][0]["finish_reason"] in ("length", "stop")
    assert request(server.port, "GET", "/healthz")[0] == 200


def test_unknown_route_and_method(server):
    status, _, raw = request(server.port, "GET", "/v1/nothing")
    assert status == 404 and "no route GET /v1/nothing" in json.loads(raw)["error"]["message"]
    status, _, raw = request(server.port, "GET", C)
    assert status == 405 and "method GET is not allowed on /v1/completions" in json.loads(raw)["error"]["message"]


def test_input_token_limit(paths):
    srv = _server(paths, max_input_tokens=50)
    try:
        status, r = post(srv.port, "/v1/embeddings", {"model": "bert", "input": ["the cat " * 60]})
        assert status == 400 and "(limits.max_input_tokens)" in r["error"]["message"]
        status, r = post(srv.port, C, {"model": "gpt", "prompt": ["the cat sat on the mat " * 3] * 4, "max_tokens": 2})
        assert status == 400 and "the limit is 50 (limits.max_input_tokens)" in r["error"]["message"]
    finally:
        srv.stop()


# ---- disconnects --------------------------------------------------------------------------------------------
def _open_stream(port: int, body: dict) -> socket.socket:
    """Send a streaming request on a raw socket and wait for its first event."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert b" 200 OK" in got.split(b"\r\n")[0], got
    return s


def test_disconnect_mid_stream_cancels_only_that_request(paths):
    srv = _server(paths, names=("rope",), options=EngineOptions(max_batch=4, max_model_len=3000), max_tokens=2500)
    undo = _slow(srv.engine("rope"), 0.005)
    try:
        s = _open_stream(srv.port, {"model": "rope", "prompt": "once", **LONG, "temperature": 0, "stream": True})
        other: list = []
        t = threading.Thread(target=lambda: other.append(post(srv.port, C, {"model": "rope", "prompt": "the cat",
                                                                            "max_tokens": 60, "temperature": 0})))
        t.start()
        s.close()  # the client goes away mid-stream
        wait_for(lambda: metric(srv.port, "lmforge_cancelled_total", model="rope", reason="disconnect") == 1,
                 what="the stream's cancellation")
        t.join(120)
        wait_for(lambda: metric(srv.port, "lmforge_running_rows", model="rope") == 0, what="the batch to empty")
        generated = metric(srv.port, "lmforge_generated_tokens_total", model="rope")
        assert generated < 1000  # far fewer than the 2500 it asked for: its work stopped
        status, r = other[0]
        assert status == 200 and r["usage"]["completion_tokens"] in range(1, 61)  # the other one finished
        assert r["choices"][0]["finish_reason"] == "length" or r["usage"]["completion_tokens"] < 60

        # a non-streaming request whose client leaves is cancelled too
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        data = json.dumps({"model": "rope", "prompt": "a", **LONG, "temperature": 0}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        wait_for(lambda: metric(srv.port, "lmforge_running_rows", model="rope") == 1, what="it to run")
        s.close()
        wait_for(lambda: metric(srv.port, "lmforge_cancelled_total", model="rope", reason="disconnect") == 2,
                 what="the second cancellation")
        wait_for(lambda: metric(srv.port, "lmforge_running_rows", model="rope") == 0, what="the batch to empty")
        assert metric(srv.port, "lmforge_generated_tokens_total", model="rope") < generated + 1000
    finally:
        undo()
        srv.stop()


# ---- queue, deadline ----------------------------------------------------------------------------------------
def test_full_queue_answers_429_with_retry_after(paths):
    """max_batch 1, max_queue 1: one runs, one waits, the next is told to retry; a waiting request whose
    client leaves is dropped without running."""
    srv = _server(paths, names=("rope",), options=EngineOptions(max_batch=1, max_model_len=3000), max_tokens=2500,
                  max_queue=1)
    undo = _slow(srv.engine("rope"), 0.005)
    try:
        running = _open_stream(srv.port, {"model": "rope", "prompt": "once", **LONG, "stream": True})
        # a queued request whose client leaves is dropped from the queue without running
        leaving = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        data = json.dumps({"model": "rope", "prompt": "bye", "max_tokens": 3}).encode()
        leaving.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        wait_for(lambda: metric(srv.port, "lmforge_queue_depth", model="rope") == 1, what="it to queue")
        leaving.close()
        wait_for(lambda: metric(srv.port, "lmforge_queue_depth", model="rope") == 0, what="it to leave the queue")
        assert metric(srv.port, "lmforge_running_rows", model="rope") == 1  # the running stream goes on

        queued: list = []
        t = threading.Thread(target=lambda: queued.append(post(srv.port, C, {"model": "rope", "prompt": "hi",
                                                                             "max_tokens": 3})))
        t.start()
        wait_for(lambda: metric(srv.port, "lmforge_queue_depth", model="rope") == 1, what="the second to queue")
        status, headers, raw = request(srv.port, "POST", C, {"model": "rope", "prompt": "hey", "max_tokens": 3})
        assert status == 429 and headers["retry-after"] == "1"
        assert "model 'rope' has 1 requests waiting (limits.max_queue)" in json.loads(raw)["error"]["message"]
        running.close()  # frees the row: the queued request runs
        t.join(120)
        assert queued[0][0] == 200
        assert metric(srv.port, "lmforge_cancelled_total", model="rope", reason="disconnect") == 2
    finally:
        undo()
        srv.stop()


def test_deadline_answers_504(paths):
    srv = _server(paths, names=("rope",), options=EngineOptions(max_batch=2, max_model_len=3000), max_tokens=2500,
                  deadline_s=0.5)
    undo = _slow(srv.engine("rope"), 0.005)  # 2500 steps take >= 12 s: far past the deadline
    try:
        status, r = post(srv.port, C, {"model": "rope", "prompt": "a", **LONG})
        assert status == 504 and "took longer than 0.5 s (limits.deadline_s)" in r["error"]["message"]
        status, _, raw = request(srv.port, "POST", C, {"model": "rope", "prompt": "a", **LONG, "stream": True})
        events = [e for e in raw.decode().split("\n\n") if e]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert "limits.deadline_s" in json.loads(events[-2][6:])["error"]["message"]
        wait_for(lambda: metric(srv.port, "lmforge_running_rows", model="rope") == 0, what="the batch to empty")
        assert metric(srv.port, "lmforge_cancelled_total", model="rope", reason="deadline") == 2
    finally:
        undo()
        srv.stop()


# ---- API key, health ----------------------------------------------------------------------------------------
def test_api_key_guards_every_route(paths):
    import base64

    openai = pytest.importorskip("openai")
    srv = _server(paths, names=("gpt",), api_key="s3cret")
    try:
        for method, path in [("GET", "/"), ("GET", "/static/playground.js"), ("GET", "/v1/models"),
                             ("GET", "/healthz"), ("GET", "/metrics"), ("POST", C)]:
            status, headers, raw = request(srv.port, method, path, {"model": "gpt", "prompt": "a"})
            assert status == 401, path
            assert "missing or wrong API key" in json.loads(raw)["error"]["message"]
            assert headers["www-authenticate"].startswith("Basic" if path in ("/", "/static/playground.js") else "Bearer")
        wrong = {"Authorization": "Bearer nope"}
        assert request(srv.port, "GET", "/v1/models", headers=wrong)[0] == 401
        assert request(srv.port, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()
        assert request(srv.port, "GET", "/", headers={"Authorization": f"Basic {basic}"})[0] == 200
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="gpt", prompt="hi", max_tokens=3).choices[0].finish_reason
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        srv.stop()


def test_healthz_follows_the_engine_loop(paths):
    srv = _server(paths, names=("gpt", "bert"))
    gate = threading.Event()
    engine = srv.engine("gpt")
    step = engine.batch.step

    def stuck_step(drop=()):
        gate.wait(60)
        return step(drop)

    engine.batch.step = stuck_step
    try:
        assert request(srv.port, "GET", "/healthz")[0] == 200
        t = threading.Thread(target=post, args=(srv.port, C, {"model": "gpt", "prompt": "a", "max_tokens": 3}))
        t.start()
        wait_for(lambda: request(srv.port, "GET", "/healthz")[0] == 503, what="/healthz to see the stuck engine")
        status, _, raw = request(srv.port, "GET", "/healthz")
        body = json.loads(raw)
        assert body["status"] == "unhealthy" and body["models"]["bert"] == "ok"
        assert body["models"]["gpt"].startswith("not responding")
        assert post(srv.port, "/v1/fill-mask", {"model": "bert", "inputs": "a [MASK]"})[0] == 200  # others serve
        gate.set()
        t.join(60)
        assert request(srv.port, "GET", "/healthz")[0] == 200
        engine._task.cancel()  # the loop is gone: unhealthy, and its requests are refused clearly
        wait_for(lambda: not engine.alive, what="the loop to stop")
        assert request(srv.port, "GET", "/healthz")[0] == 503
        status, r = post(srv.port, C, {"model": "gpt", "prompt": "a", "max_tokens": 3})
        assert status == 500 and "engine is not running" in r["error"]["message"]
    finally:
        gate.set()
        engine.batch.step = step
        srv.stop()


# ---- the command line: errors, and a graceful stop on SIGTERM -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_errors_are_one_line(paths, tmp_path):
    for args, message in [((str(tmp_path / "missing"),), "no such"),
                          ((f"a={paths['gpt']}", f"a={paths['bert']}"), "two models are named 'a'"),
                          ((str(paths["gpt"]), "--limits.max_n", "0"), "limits.max_n must be a positive integer"),
                          ((str(paths["gpt"]), "--engine.max_model_len", "4096"), "exceeds model 'gpt''s context of 128")]:
        p = _cli(*args)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err


def test_sigterm_lets_the_running_stream_finish(paths):
    port = _free_port()
    p = _cli(f"rope={paths['rope']}", "--port", str(port), "--grace_s", "60", "--log_level", "warning",
             "--engine.max_model_len", "3000", "--limits.max_tokens", "2500")
    try:
        wait_for(lambda: _healthy(port) or p.poll() is not None, timeout=120, what="the server to start")
        assert p.poll() is None, p.communicate()[1]
        s = _open_stream(port, {"model": "rope", "prompt": "a", **LONG, "temperature": 0, "stream": True})
        p.send_signal(signal.SIGTERM)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
            if got.rstrip().endswith(b"0\r\n\r\n") or b"data: [DONE]" in got:
                break
        s.close()
        assert b"data: [DONE]" in got
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in got.decode("utf-8", "replace").split("\n")
                    if line.startswith("data: {")]
        assert [f for f in finishes if f] == ["length"]  # it ran to its end (2500 tokens), not cut off
        # uvicorn stops gracefully, then ends by the signal it caught (as the signal's default would)
        assert p.wait(timeout=120) in (0, -signal.SIGTERM)
        assert "Traceback" not in p.communicate()[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def _healthy(port: int) -> bool:
    try:
        return request(port, "GET", "/healthz", timeout=5)[0] == 200
    except OSError:
        return False


def test_a_failing_model_call_fails_its_requests_only(paths):
    """If the model raises mid-batch (a bug, out of memory), the rows in that batch get a 500 saying so; the
    engine starts an empty batch and keeps serving."""
    srv = _server(paths, names=("gpt",))
    engine = srv.engine("gpt")
    step = engine.batch.step
    calls = {"n": 0}

    def failing_step(drop=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out of memory")
        return step(drop)

    engine.batch.step = failing_step
    try:
        status, r = post(srv.port, C, {"model": "gpt", "prompt": "a", "max_tokens": 20, "ignore_eos": True})
        assert status == 500 and "model 'gpt' failed on this request (RuntimeError)" in r["error"]["message"]
        status, r = post(srv.port, C, {"model": "gpt", "prompt": "a", "max_tokens": 20, "ignore_eos": True})
        assert status == 200 and r["usage"]["completion_tokens"] == 20
        assert request(srv.port, "GET", "/healthz")[0] == 200
    finally:
        engine.batch.step = step
        srv.stop()


@pytest.mark.parametrize("extra,message", [
    (["--api_key", "a", "--api_key_file", "k.txt"], "give --api_key or --api_key_file, not both"),
    (["--api_key_file", "missing.txt"], "missing.txt: API key file not found"),
    (["--api_key_file", "empty.txt"], "empty.txt: the API key file is empty"),
    (["--api_key", "has space"], "the API key must be non-empty and hold no spaces"),
    (["--port", "70000"], "port must be in 0..65535"),
    (["--device", "gpu7"], "device: 'gpu7' is not a device"),
])
def test_serve_option_errors(paths, tmp_path, monkeypatch, extra, message):
    from lmforge.cli import run_verb
    from lmforge.errors import LmforgeError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "k.txt").write_text("key\n")
    with pytest.raises(LmforgeError, match=re.escape(message)):
        run_verb("serve", [str(paths["gpt"]), *extra])
