"""`/v1/classify`, `/v1/tag` (and `/v1/qa` once the QA task lands) serve fine-tuned task models (made here
with `lmforge finetune`) exactly as the library's `load_task_model(path).predict` answers; a model asked
for the wrong kind of input, or a task it does not do, gets a clear 4xx."""
from __future__ import annotations

import json

import pytest

from lmforge.serve.app import build_app, build_engines
from lmforge.serve.config import Limits
from lmforge.serve.metrics import Metrics

from serve_helpers import Server, make_classifier, make_qa, make_tagger, post, request

tasks = pytest.importorskip("lmforge.tasks")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_tasks")
    return {"cls": make_classifier(d / "cls"), "ner": make_tagger(d / "ner")}


@pytest.fixture(scope="module")
def server(runs):
    limits, metrics = Limits(max_inputs=8), Metrics()
    engines = build_engines([f"sentiment={runs['cls']}", f"ner={runs['ner']}"], limits=limits, metrics=metrics)
    srv = Server(build_app(engines, limits=limits, metrics=metrics))
    yield srv
    srv.stop()


def test_models_describe_their_task(server):
    data = {m["id"]: m for m in json.loads(request(server.port, "GET", "/v1/models")[2])["data"]}
    assert data["sentiment"]["capabilities"] == ["classify"] and data["sentiment"]["labels"] == ["neg", "pos"]
    assert data["ner"]["capabilities"] == ["tag"] and data["ner"]["labels"][0] == "O"


def test_classify_equals_the_library(server, runs):
    texts = ["the film was great", "it was awful and dull", "the plot"]
    expected = tasks.load_task_model(runs["cls"]).predict([{"text": t, "text_pair": None} for t in texts])
    status, r = post(server.port, "/v1/classify", {"model": "sentiment", "inputs": texts})
    assert status == 200 and r["labels"] == ["neg", "pos"]
    for got, want, i in zip(r["data"], expected, range(3)):
        assert got["index"] == i and got["label"] == want["label"]
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-6)
        assert sum(got["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    status, r = post(server.port, "/v1/classify", {"model": "sentiment", "inputs": [{"text": texts[0]}]})
    assert status == 200 and r["data"][0]["label"] == expected[0]["label"]


def test_tag_equals_the_library_with_character_offsets(server, runs):
    texts = ["yesterday alice went to  paris", "bob met carol in rome"]
    expected = tasks.load_task_model(runs["ner"]).predict([{"text": t} for t in texts])
    status, r = post(server.port, "/v1/tag", {"model": "ner", "inputs": texts})
    assert status == 200
    for got, want, text in zip(r["data"], expected, texts):
        assert got["words"] == want["words"] and got["tags"] == want["tags"] and got["text"] == text
        assert [(e["type"], e["start"], e["end"]) for e in got["entities"]] == \
               [(e["type"], e["start"], e["end"]) for e in want["entities"]]
        for e in got["entities"]:
            assert text[e["start"]:e["end"]] == e["text"]


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/classify", {"model": "sentiment", "inputs": [{"text": "good", "text_pair": "bad"}]}, 400,
     "model 'sentiment' classifies single sentences; leave out text_pair"),
    ("/v1/classify", {"model": "sentiment", "inputs": [{"txt": "good"}]}, 400, "unknown field 'inputs[0].txt' (did you mean 'text'?)"),
    ("/v1/classify", {"model": "sentiment", "inputs": 5}, 400, "inputs must be a string, or a list of strings or"),
    ("/v1/classify", {"model": "sentiment", "inputs": []}, 400, "inputs is an empty list"),
    ("/v1/classify", {"model": "ner", "inputs": ["good"]}, 400, "model 'ner' cannot classify: it is a tag task model"),
    ("/v1/tag", {"model": "sentiment", "inputs": ["alice"]}, 400, "model 'sentiment' cannot tag"),
    ("/v1/tag", {"model": "ner", "inputs": [3]}, 400, "inputs must be a string or a list"),
    ("/v1/qa", {"model": "ner", "inputs": [{"question": "who", "context": "alice"}]}, 400,
     "model 'ner' cannot answer questions"),
    ("/v1/completions", {"model": "sentiment", "prompt": "a"}, 400, "model 'sentiment' cannot generate completions"),
])
def test_task_bad_requests(server, path, body, status, message):
    code, r = post(server.port, path, body)
    assert code == status and message in r["error"]["message"], r


def test_qa_equals_the_library(tmp_path):
    """Span QA: the answer and its character offsets in the context, as the library's predictor gives them."""
    if "qa" not in tasks.TASKS:
        pytest.skip("the 'qa' task is not in lmforge.tasks yet")
    run = make_qa(tmp_path / "qa")
    inputs = [{"question": "where did bob go ?", "context": "bob went to rome yesterday ."},
              {"question": "where did alice go ?", "context": "alice went to oslo yesterday ."}]
    expected = tasks.load_task_model(run).predict(inputs)
    srv = Server(build_app(build_engines([f"qa={run}"])))
    try:
        status, r = post(srv.port, "/v1/qa", {"model": "qa", "inputs": inputs})
        assert status == 200 and r["data"] == [dict(p, index=i) for i, p in enumerate(expected)]
        for item, x in zip(r["data"], inputs):
            if item["start"] is not None:
                assert x["context"][item["start"]:item["end"]] == item["answer"]
        status, r = post(srv.port, "/v1/qa", {"model": "qa", "inputs": [{"question": "where ?", "contxt": "x"}]})
        assert status == 400 and "unknown field 'inputs[0].contxt' (did you mean 'context'?)" in r["error"]["message"]
    finally:
        srv.stop()
