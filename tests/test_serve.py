"""`lmforge serve` over real HTTP on loopback: the official `openai` client (completions, streaming,
embeddings), lmforge's own routes, and seeded sampling that gives the same text alone or batched. The
references are the library's own functions on the same weights (`generation.generate`,
`recipes.embed.encode_sentences`, `recipes.fill_mask.predict_masks`, `recipes.attention.attention_matrix`),
which their own tests check against transformers and sentence-transformers."""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
import torch

import lmforge
from lmforge.generation import generate
from lmforge.serve.app import build_app, build_engines
from lmforge.serve.config import EngineOptions, Limits
from lmforge.serve.metrics import Metrics

from serve_helpers import Server, make_bert, make_gpt, make_lstm, metric, post, request, wait_for

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    return {"gpt": make_gpt(d / "gpt"), "bert": make_bert(d / "bert")}


@pytest.fixture(scope="module")
def server(paths):
    limits = Limits(max_tokens=200, max_n=4, max_inputs=8)
    metrics = Metrics()
    engines = build_engines([f"gpt={paths['gpt']}", f"bert={paths['bert']}", "minilm-l6"],
                            options=EngineOptions(max_batch=8), limits=limits, metrics=metrics)
    srv = Server(build_app(engines, limits=limits, metrics=metrics))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gpt(paths):
    model, tok, _ = lmforge.load(paths["gpt"])
    return model, tok


def _reference(gpt, prompt: str, max_tokens: int, temperature: float, seed: int | None = None, top_p: float = 1.0):
    model, tok = gpt
    out = generate(model, [tok.encode(prompt)], max_new_tokens=max_tokens, do_sample=temperature > 0,
                   temperature=temperature or 1.0, top_p=top_p, seed=seed, eos_token_id=tok.eos_id)[0]
    return tok.decode(out)


def test_models_health_and_playground(server):
    status, _, body = request(server.port, "GET", "/v1/models")
    data = json.loads(body)["data"]
    assert status == 200 and [m["id"] for m in data] == ["gpt", "bert", "minilm-l6"]
    caps = {m["id"]: m["capabilities"] for m in data}
    assert caps == {"gpt": ["completions", "attention"], "bert": ["embeddings", "fill-mask", "attention"],
                    "minilm-l6": ["embeddings", "attention"]}  # MiniLM's MLM head is not in its weights
    status, _, body = request(server.port, "GET", "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok", "models": {n: "ok" for n in caps}}
    status, headers, body = request(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"playground.js" in body
    for asset in ("/static/playground.js", "/static/playground.css"):
        assert request(server.port, "GET", asset)[0] == 200


def test_openai_completion_matches_generate(client, gpt):
    r = client.completions.create(model="gpt", prompt="the quick", max_tokens=20, temperature=0.8, seed=11)
    assert r.object == "text_completion" and r.model == "gpt"
    assert r.choices[0].text == _reference(gpt, "the quick", 20, 0.8, seed=11)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(gpt[1].encode("the quick"))
    greedy = client.completions.create(model="gpt", prompt="hello", max_tokens=12, temperature=0)
    assert greedy.choices[0].text == _reference(gpt, "hello", 12, 0.0)


def test_openai_streaming_equals_the_whole_answer(client, gpt):
    whole = client.completions.create(model="gpt", prompt="once upon", max_tokens=30, temperature=1.0, seed=3,
                                      top_p=0.9)
    chunks = list(client.completions.create(model="gpt", prompt="once upon", max_tokens=30, temperature=1.0, seed=3,
                                            top_p=0.9, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text == _reference(gpt, "once upon", 30, 1.0, seed=3, top_p=0.9)
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # streamed in pieces
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_is_server_sent_events_ending_in_done(server):
    status, headers, body = request(server.port, "POST", "/v1/completions",
                                    {"model": "gpt", "prompt": "hi", "max_tokens": 5, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_prompts_choices_and_seeds(server, gpt):
    status, r = post(server.port, "/v1/completions", {"model": "gpt", "prompt": ["the cat", "hello world"], "n": 2,
                                                       "max_tokens": 15, "temperature": 1.0, "seed": 5})
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for k, c in enumerate(r["choices"]):  # choice k: prompt k // n, seed + k
        assert c["text"] == _reference(gpt, ["the cat", "hello world"][k // 2], 15, 1.0, seed=5 + k)
    tok = gpt[1]
    status, r2 = post(server.port, "/v1/completions", {"model": "gpt", "prompt": [tok.encode("the cat")],
                                                        "max_tokens": 15, "temperature": 1.0, "seed": 5})
    assert status == 200 and r2["choices"][0]["text"] == r["choices"][0]["text"]  # token-id prompts


def test_stop_strings_and_logprobs(server, gpt):
    full = _reference(gpt, "the", 40, 0.0)
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    status, r = post(server.port, "/v1/completions", {"model": "gpt", "prompt": "the", "max_tokens": 40,
                                                       "temperature": 0, "stop": [stop], "logprobs": 2})
    choice = r["choices"][0]
    assert status == 200 and choice["finish_reason"] == "stop" and choice["text"] == full[:full.index(stop)]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(x, abs=1e-6)  # greedy: the top token
               for top, x in zip(lp["top_logprobs"], lp["token_logprobs"]))


def test_seed_gives_the_same_text_alone_or_batched(server, gpt):
    """A seeded request's text does not depend on what else is in the batch (and equals `generate`)."""
    body = {"model": "gpt", "prompt": "the movie was", "max_tokens": 40, "temperature": 1.0, "seed": 1234}
    alone = post(server.port, "/v1/completions", body)[1]["choices"][0]["text"]
    assert alone == _reference(gpt, "the movie was", 40, 1.0, seed=1234)
    steps_before = metric(server.port, "lmforge_batch_size_count", model="gpt")
    singles_before = metric(server.port, "lmforge_batch_size_bucket", model="gpt", le="1.0")

    # A long greedy request keeps the batch busy (each step slowed a little, so that the tiny model cannot
    # finish before the others arrive) while the others join it between its steps.
    batch = server.engine("gpt").batch
    step = batch.step

    def slow_step(drop=()):
        time.sleep(0.005)
        return step(drop)

    batch.step = slow_step
    try:
        long_status = []
        long = threading.Thread(target=lambda: long_status.append(post(server.port, "/v1/completions", {
            "model": "gpt", "prompt": "a", "max_tokens": 120, "temperature": 0, "ignore_eos": True})[0]), daemon=True)
        long.start()
        wait_for(lambda: metric(server.port, "lmforge_running_rows", model="gpt") >= 1, what="the long request to run")
        results: dict[int, str] = {}

        def one(i):
            b = dict(body) if i == 0 else {"model": "gpt", "prompt": f"hello {i}", "max_tokens": 30 + i,
                                           "temperature": 0.7, "seed": i}
            results[i] = post(server.port, "/v1/completions", b)[1]["choices"][0]["text"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        long.join(120)
    finally:
        batch.step = step
    assert long_status == [200] and results[0] == alone
    steps = metric(server.port, "lmforge_batch_size_count", model="gpt") - steps_before
    singles = metric(server.port, "lmforge_batch_size_bucket", model="gpt", le="1.0") - singles_before
    assert steps > singles  # some decoding steps really ran several rows together


def test_openai_embeddings_match_the_library(client):
    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    model, tok, cfg = lmforge.load("minilm-l6")
    from lmforge.recipes.embed import encode_sentences

    expected = encode_sentences(model, tok, sentences, max_length=cfg["interop"]["max_seq_length"]).numpy()
    r = client.embeddings.create(model="minilm-l6", input=sentences)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    r = client.embeddings.create(model="minilm-l6", input=sentences[0], encoding_format="float")
    np.testing.assert_allclose(r.data[0].embedding, expected[0], atol=1e-5)
    assert r.usage.prompt_tokens == len(tok.encode(sentences[0])) + 2


def test_embeddings_report_truncation(server):
    long = " ".join(["word"] * 300)
    status, r = post(server.port, "/v1/embeddings", {"model": "minilm-l6", "input": ["short one", long],
                                                      "encoding_format": "base64"})
    _, tok, _ = lmforge.load("minilm-l6")
    n_long = len(tok.encode(long)) + 2
    assert status == 200
    assert [d["truncated_tokens"] for d in r["data"]] == [0, n_long - 256]  # max_seq_length 256, said, not silent
    assert r["usage"]["truncated_tokens"] == n_long - 256 and r["usage"]["truncated_inputs"] == 1
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)


def test_fill_mask_matches_the_library(server, paths):
    from lmforge.recipes.fill_mask import predict_masks

    model, tok, _ = lmforge.load(paths["bert"])
    texts = ["the movie was [MASK] .", "the [MASK] sat on the [MASK] ."]
    status, r = post(server.port, "/v1/fill-mask", {"model": "bert", "inputs": texts, "top_k": 3})
    assert status == 200
    for item, text in zip(r["data"], texts):
        expected = predict_masks(model, tok, text, 3)
        assert [[c["id"] for c in m] for m in item["masks"]] == [[i for _, i, _ in m] for m in expected]
        for m, e in zip(item["masks"], expected):
            assert [c["score"] for c in m] == pytest.approx([p for _, _, p in e], abs=1e-6)


def test_attention_matches_the_library(server, paths):
    from lmforge.recipes.attention import attention_matrix

    model, tok, cfg = lmforge.load(paths["gpt"])
    status, r = post(server.port, "/v1/attention", {"model": "gpt", "text": "the cat sat", "layer": 0, "head": 1})
    matrix, labels, title = attention_matrix(model, tok, "the cat sat", layer=0, head=1, arch="gpt")
    assert status == 200 and r["tokens"] == labels and r["title"] == title
    np.testing.assert_allclose(np.array(r["matrix"]), matrix, atol=1e-6)
    np.testing.assert_allclose(np.array(r["matrix"]).sum(-1), 1.0, atol=1e-5)


def test_metrics_name_what_the_issue_asks(server):
    post(server.port, "/v1/completions", {"model": "gpt", "prompt": "hi", "max_tokens": 3})
    post(server.port, "/v1/completions", {"model": "nope", "prompt": "hi"})
    _, headers, body = request(server.port, "GET", "/metrics")
    text = body.decode()
    assert headers["content-type"].startswith("text/plain")
    for name in ("lmforge_requests_total", "lmforge_request_errors_total", "lmforge_queue_depth",
                 "lmforge_batch_size_bucket", "lmforge_time_to_first_token_seconds_bucket",
                 "lmforge_generated_tokens_total", "lmforge_completion_tokens_per_second_bucket"):
        assert name in text, name
    assert metric(server.port, "lmforge_request_errors_total", route="/v1/completions", status="404") >= 1
    assert metric(server.port, "lmforge_requests_total", route="/v1/completions", status="200") >= 1


def test_recurrent_model_completions(tmp_path):
    """An LSTM LM is served too (batched over its per-row state) and streams what `generate` gives."""
    path = make_lstm(tmp_path / "lstm")
    srv = Server(build_app(build_engines([f"lstm={path}"], options=EngineOptions(max_batch=4))))
    try:
        model, tok, _ = lmforge.load(path)
        caps = json.loads(request(srv.port, "GET", "/v1/models")[2])["data"][0]["capabilities"]
        assert caps == ["completions"]
        results = {}

        def one(seed):
            results[seed] = post(srv.port, "/v1/completions", {"model": "lstm", "prompt": "the cat", "max_tokens": 25,
                                                                "temperature": 1.0, "seed": seed})

        threads = [threading.Thread(target=one, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for seed, (status, r) in results.items():
            want = generate(model, [tok.encode("the cat")], max_new_tokens=25, do_sample=True, seed=seed,
                            eos_token_id=tok.eos_id)[0]
            assert status == 200 and r["choices"][0]["text"] == tok.decode(want)
    finally:
        srv.stop()


def test_prefill_budget_admits_in_turns(paths, gpt):
    """With a prefill budget of one prompt token per call, joining prompts are prefilled one per step (the
    first always goes in), and every seeded answer is still `generate`'s."""
    srv = Server(build_app(build_engines([f"gpt={paths['gpt']}"], options=EngineOptions(max_batch=8, prefill_tokens=1))))
    add = srv.engine("gpt").batch.add
    sizes: list[int] = []
    srv.engine("gpt").batch.add = lambda groups: sizes.append(len(groups)) or add(groups)
    try:
        prompts = ["the cat", "hello world", "once upon a time", "the movie"]
        results = {}

        def one(i):
            results[i] = post(srv.port, "/v1/completions", {"model": "gpt", "prompt": prompts[i], "max_tokens": 20,
                                                             "temperature": 1.0, "seed": i})[1]
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sizes and max(sizes) == 1
        for i in range(4):
            assert results[i]["choices"][0]["text"] == _reference(gpt, prompts[i], 20, 1.0, seed=i)
    finally:
        srv.stop()
