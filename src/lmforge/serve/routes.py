"""The HTTP routes: check a request (its body is parsed by `bodies.read_body`), call the model's engine,
shape the answer. Completions, embeddings and models follow OpenAI's API (completions also take three of
vLLM's extensions: `top_k`, `repetition_penalty`, `ignore_eos`); fill-mask, classify, tag, qa and
attention are lmforge's own ("lists in, labels/spans/tokens with scores out"). Every refusal is a 4xx with
one clear line: a value out of range or over a limit, an unknown model (404), a task the model cannot do
(400). Routes never touch tensors: the engine takes and returns plain values.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmforge.config import closest
from lmforge.serve.batcher import Sampling
from lmforge.serve.bodies import (ApiError, AttentionBody, ClassifyBody, CompletionBody, EmbeddingBody, FillMaskBody,
                                  QABody, TagBody, read_body)
from lmforge.serve.engine import Engine, Generation

router = APIRouter()
MAX_LOGPROBS = 5  # OpenAI's limit for completions
MAX_STOPS = 4


# ---- shared helpers --------------------------------------------------------------------------------------
VERBS = {"completions": "generate completions", "embeddings": "embed", "fill-mask": "fill masks",
         "classify": "classify", "tag": "tag", "qa": "answer questions", "attention": "show attention"}


def engine_for(request: Request, name: str | None, capability: str) -> Engine:
    """The engine of model `name` that can do `capability` (the only able one when `name` is omitted)."""
    engines: dict[str, Engine] = request.app.state.engines
    if name is None:
        able = [e for e in engines.values() if capability in e.capabilities]
        if len(able) == 1:
            return able[0]
        if not able:
            raise ApiError(400, f"no loaded model can {VERBS[capability]} (loaded: {', '.join(engines)})",
                           param="model", code="unsupported_task")
        raise ApiError(400, f"missing required field 'model' (one of: {', '.join(e.name for e in able)})",
                       param="model")
    if name not in engines:
        raise ApiError(404, f"model '{name}' is not loaded{closest(name, engines)}; loaded: {', '.join(engines)}",
                       param="model", code="model_not_found")
    engine = engines[name]
    if capability not in engine.capabilities:
        raise ApiError(400, f"model '{name}' cannot {VERBS[capability]}: it is a {engine.kind} "
                            f"(it can: {', '.join(engine.capabilities)})", param="model", code="unsupported_task")
    return engine


def _texts(value: str | list, field: str, limits) -> list:
    """A single input or a list of them, non-empty, at most limits.max_inputs."""
    items = [value] if not isinstance(value, list) else value
    if not items:
        raise ApiError(400, f"{field} is an empty list; give at least one input", param=field)
    if len(items) > limits.max_inputs:
        raise ApiError(400, f"{field} has {len(items)} items; the limit is {limits.max_inputs} (limits.max_inputs)",
                       param=field)
    for i, item in enumerate(items):
        text = item if isinstance(item, str) else getattr(item, "text", getattr(item, "context", "x"))
        if isinstance(text, str) and not text.strip():
            where = f"{field}[{i}]" if isinstance(value, list) else field
            raise ApiError(400, f"{where} is empty; give some text", param=field)
    return items


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, coro):
    """Await `coro`, cancelling it when the client goes away (then None is returned)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None
    finally:
        gone.cancel()


# ---- completions -----------------------------------------------------------------------------------------
def _sampling(body: CompletionBody, limits) -> tuple[Sampling, int]:
    """Check the sampling fields against OpenAI's ranges and the server's limits."""
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} exceeds the limit of {limits.max_tokens} (limits.max_tokens)",
                       param="max_tokens")
    n = 1 if body.n is None else body.n
    if n < 1:
        raise ApiError(400, f"n must be at least 1, got {n}", param="n")
    if n > limits.max_n:
        raise ApiError(400, f"n {n} exceeds the limit of {limits.max_n} (limits.max_n)", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    if top_k < 0:
        raise ApiError(400, f"top_k must be positive (or -1 / null for no limit), got {top_k}", param="top_k")
    penalty = 1.0 if body.repetition_penalty is None else body.repetition_penalty
    if not penalty > 0:
        raise ApiError(400, f"repetition_penalty must be positive, got {penalty}", param="repetition_penalty")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {body.logprobs}", param="logprobs")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", param="stop")
    if body.seed is not None and not 0 <= body.seed < 2 ** 63 - 2 ** 20:
        raise ApiError(400, f"seed must be a non-negative 63-bit integer, got {body.seed}", param="seed")
    unsupported = {"echo": body.echo, "suffix": body.suffix, "logit_bias": body.logit_bias,
                   "frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty}
    for name, value in unsupported.items():
        if value:
            hint = " (use repetition_penalty)" if name.endswith("_penalty") else ""
            raise ApiError(400, f"{name} is not supported{hint}", param=name)
    if body.best_of not in (None, n):
        raise ApiError(400, "best_of is not supported (leave it out, or equal to n)", param="best_of")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=penalty, logprobs=body.logprobs, stop=tuple(stops),
                    ignore_eos=bool(body.ignore_eos)), n


def _prompts(body: CompletionBody, limits) -> list:
    p = body.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts:
        raise ApiError(400, "prompt is an empty list; give at least one prompt", param="prompt")
    if len(prompts) > limits.max_inputs:
        raise ApiError(400, f"prompt has {len(prompts)} prompts; the limit is {limits.max_inputs} (limits.max_inputs)",
                       param="prompt")
    if any(isinstance(x, list) and not x for x in prompts):
        raise ApiError(400, "a token-id prompt is an empty list", param="prompt")
    return prompts


@router.post("/v1/completions")
async def completions(request: Request):
    body = await read_body(request, CompletionBody)
    limits = request.app.state.limits
    engine = engine_for(request, body.model, "completions")
    sampling, n = _sampling(body, limits)
    prompts = _prompts(body, limits)
    ids = engine.encode_prompts(prompts, sampling.max_tokens)
    gen = engine.submit(ids, sampling, n=n, seed=body.seed)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name}
    usage = {"prompt_tokens": sum(len(x) for x in ids)}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, gen, head, usage, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await until_disconnect(request, _collect(engine, gen, len(prompts) * n, body.logprobs is not None))
    if result is None:  # the client went away; its work was cancelled
        return Response(status_code=499)
    choices, generated = result
    usage.update(completion_tokens=generated, total_tokens=usage["prompt_tokens"] + generated)
    return dict(head, choices=choices, usage=usage)


async def _events(engine: Engine, gen: Generation):
    """The engine's events for one completion until it is done; an error event raises."""
    try:
        while True:
            event = await gen.events.get()
            if event[0] == "done":
                return
            if event[0] == "error":
                raise event[1]
            yield event
    finally:
        engine.cancel(gen)  # a no-op when it finished; otherwise the client went away: stop its work


async def _collect(engine: Engine, gen: Generation, n_choices: int, want_logprobs: bool) -> tuple[list[dict], int]:
    """The whole answer of a non-streaming completion: each choice's text, logprobs and finish reason."""
    texts = [""] * n_choices
    finish: list[str | None] = [None] * n_choices
    lps = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(n_choices)]
    generated = 0
    async for event in _events(engine, gen):
        if event[0] == "text":
            _, k, text, lp = event
            texts[k] += text
            if lp is not None:
                _add_logprob(lps[k], lp)
        else:
            _, k, reason, tokens = event
            finish[k] = reason
            generated += tokens
    return [{"index": k, "text": texts[k], "logprobs": lps[k] if want_logprobs else None, "finish_reason": finish[k]}
            for k in range(n_choices)], generated


def _add_logprob(into: dict, lp: dict) -> None:
    into["tokens"].append(lp["token"])
    into["token_logprobs"].append(lp["logprob"])
    into["top_logprobs"].append(lp["top"])
    into["text_offset"].append(lp["offset"])


async def _stream(engine: Engine, gen: Generation, head: dict, usage: dict, include_usage: bool):
    """Server-sent events: one chunk per piece of text, one with each choice's finish_reason, `[DONE]`."""
    generated = 0
    try:
        async for event in _events(engine, gen):
            if event[0] == "text":
                _, k, text, lp = event
                logprobs = None
                if lp is not None:
                    logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    _add_logprob(logprobs, lp)
                choice = {"index": k, "text": text, "logprobs": logprobs, "finish_reason": None}
            else:
                _, k, reason, tokens = event
                generated += tokens
                choice = {"index": k, "text": "", "logprobs": None, "finish_reason": reason}
            yield _sse(dict(head, choices=[choice]))
        if include_usage:
            yield _sse(dict(head, choices=[], usage=dict(usage, completion_tokens=generated,
                                                         total_tokens=usage["prompt_tokens"] + generated)))
    except Exception as e:  # the response has started: the error goes in the stream
        error = error_of(e)
        yield _sse({"error": {"message": error.message, "type": error.type, "param": None, "code": error.status}})
    yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_of(exc: Exception) -> ApiError:
    """The HTTP answer for an exception raised while serving (see app.py's handlers)."""
    from lmforge.errors import LmforgeError
    from lmforge.serve.engine import DeadlineExceeded, EngineFailed, QueueFull, ShuttingDown

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type="rate_limit_error", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, str(exc), type="server_error")
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, str(exc), type="timeout_error")
    if isinstance(exc, EngineFailed):
        return ApiError(500, str(exc), type="server_error")
    if isinstance(exc, LmforgeError):
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")


# ---- embeddings ------------------------------------------------------------------------------------------
@router.post("/v1/embeddings")
async def embeddings(request: Request):
    body = await read_body(request, EmbeddingBody)
    limits = request.app.state.limits
    engine = engine_for(request, body.model, "embeddings")
    texts = _texts(body.input, "input", limits)
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "input must be text: token-id input is not supported for embeddings", param="input")
    engine.check_texts(texts)
    result = await until_disconnect(request, engine.run_job("embed", texts))
    if result is None:
        return Response(status_code=499)
    dim = len(result["vectors"][0])
    if body.dimensions is not None and body.dimensions != dim:
        raise ApiError(400, f"dimensions {body.dimensions}: model '{engine.name}' gives {dim}-dimensional "
                            f"embeddings and cannot shorten them", param="dimensions")
    data = []
    for i, (vec, truncated) in enumerate(zip(result["vectors"], result["truncated"])):
        value = (base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")
                 if body.encoding_format == "base64" else vec)
        data.append({"object": "embedding", "index": i, "embedding": value, "truncated_tokens": truncated})
    tokens = sum(result["tokens"])
    return {"object": "list", "model": engine.name, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "truncated_tokens": sum(result["truncated"]),
                      "truncated_inputs": sum(1 for t in result["truncated"] if t)}}


# ---- lmforge's own tasks ---------------------------------------------------------------------------------
async def _job(request: Request, engine: Engine, kind: str, payload: Any):
    result = await until_disconnect(request, engine.run_job(kind, payload))
    if result is None:
        raise _ClientGone()
    return result


class _ClientGone(Exception):
    """The client disconnected before the answer was ready (answered 499, which nobody reads)."""


@router.post("/v1/fill-mask")
async def fill_mask(request: Request):
    body = await read_body(request, FillMaskBody)
    limits = request.app.state.limits
    engine = engine_for(request, body.model, "fill-mask")
    texts = _texts(body.inputs, "inputs", limits)
    top_k = 5 if body.top_k is None else body.top_k
    if not 1 <= top_k <= 100:
        raise ApiError(400, f"top_k must be in [1, 100], got {top_k}", param="top_k")
    engine.check_texts(texts)
    masks = await _job(request, engine, "fill_mask", (texts, top_k))
    return {"object": "list", "model": engine.name,
            "data": [{"index": i, "text": t, "masks": m} for i, (t, m) in enumerate(zip(texts, masks))]}


@router.post("/v1/classify")
async def classify(request: Request):
    body = await read_body(request, ClassifyBody)
    limits = request.app.state.limits
    engine = engine_for(request, body.model, "classify")
    items = _texts(body.inputs, "inputs", limits)
    inputs = [{"text": x, "text_pair": None} if isinstance(x, str) else x.model_dump() for x in items]
    pair = engine.predictor.task == "pair"
    for i, x in enumerate(inputs):
        if pair and not x["text_pair"]:
            raise ApiError(400, f"inputs[{i}]: model '{engine.name}' classifies sentence pairs; give "
                                f"{{\"text\": ..., \"text_pair\": ...}}", param="inputs")
        if not pair and x["text_pair"] is not None:
            raise ApiError(400, f"inputs[{i}]: model '{engine.name}' classifies single sentences; leave out "
                                f"text_pair", param="inputs")
    engine.check_texts([t for x in inputs for t in (x["text"], x["text_pair"]) if t])
    preds = await _job(request, engine, "predict", inputs)
    return {"object": "list", "model": engine.name, "labels": list(engine.predictor.labels),
            "data": [dict(p, index=i) for i, p in enumerate(preds)]}


@router.post("/v1/tag")
async def tag(request: Request):
    body = await read_body(request, TagBody)
    limits = request.app.state.limits
    engine = engine_for(request, body.model, "tag")
    texts = _texts(body.inputs, "inputs", limits)
    engine.check_texts(texts)
    preds = await _job(request, engine, "predict", [{"text": t} for t in texts])
    return {"object": "list", "model": engine.name,
            "data": [dict(p, index=i, text=t) for i, (t, p) in enumerate(zip(texts, preds))]}


@router.post("/v1/qa")
async def qa(request: Request):
    body = await read_body(request, QABody)
    limits = request.app.state.limits
    engine = engine_for(request, body.model, "qa")
    items = _texts(body.inputs, "inputs", limits)
    inputs = [x.model_dump() for x in items]
    engine.check_texts([t for x in inputs for t in (x["question"], x["context"])])
    preds = await _job(request, engine, "predict", inputs)
    return {"object": "list", "model": engine.name, "data": [dict(p, index=i) for i, p in enumerate(preds)]}


@router.post("/v1/attention")
async def attention(request: Request):
    body = await read_body(request, AttentionBody)
    engine = engine_for(request, body.model, "attention")
    _texts(body.text, "text", request.app.state.limits)
    engine.check_texts([body.text])
    result = await _job(request, engine, "attention", (body.text, -1 if body.layer is None else body.layer, body.head))
    return dict(result, model=engine.name)


# ---- models, health, metrics -----------------------------------------------------------------------------
@router.get("/v1/models")
async def models(request: Request):
    engines: dict[str, Engine] = request.app.state.engines
    return {"object": "list", "data": [dict({"id": e.name, "object": "model", "created": e.created,
                                             "owned_by": "lmforge"}, **e.describe()) for e in engines.values()]}


@router.get("/healthz")
async def healthz(request: Request):
    engines: dict[str, Engine] = request.app.state.engines
    timeout = request.app.state.health_timeout
    answers = await asyncio.gather(*(e.ping(timeout) for e in engines.values()))
    status = {e.name: ("ok" if ok else f"not responding ({e.last_error or 'engine loop stopped or stuck'})")
              for e, ok in zip(engines.values(), answers)}
    healthy = all(answers)
    return JSONResponse({"status": "ok" if healthy else "unhealthy", "models": status},
                        status_code=200 if healthy else 503)


@router.get("/metrics")
async def metrics(request: Request):
    from lmforge.serve.metrics import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
