"""What a request may say: the body of each route as a strict pydantic model, and `read_body`, which
turns any bad body into one clear line in OpenAI's error shape, {"error": {"message", "type", "param",
"code"}}: an oversized body (413), invalid UTF-8, malformed JSON, a non-object, an unknown field (with the
closest valid name), a missing one, a wrong type. Ranges and limits are checked by the routes.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from lmforge.config import closest


class ApiError(Exception):
    """An error answer: HTTP status, one-line message, OpenAI error type, the offending field."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Body):
    include_usage: Optional[bool] = False


class CompletionBody(Body):
    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = None
    n: Optional[int] = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    repetition_penalty: Optional[float] = 1.0
    ignore_eos: Optional[bool] = False
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    frequency_penalty: Optional[float] = 0.0
    presence_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    suffix: Optional[str] = None
    user: Optional[str] = None


class EmbeddingBody(Body):
    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Optional[Literal["float", "base64"]] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class FillMaskBody(Body):
    model: Optional[str] = None
    inputs: Union[str, list[str]]
    top_k: Optional[int] = 5


class Pair(Body):
    text: str
    text_pair: Optional[str] = None


class ClassifyBody(Body):
    model: Optional[str] = None
    inputs: Union[str, list[Union[str, Pair]]]


class TagBody(Body):
    model: Optional[str] = None
    inputs: Union[str, list[str]]


class Question(Body):
    question: str
    context: str


class QABody(Body):
    model: Optional[str] = None
    inputs: Union[Question, list[Question]]


class AttentionBody(Body):
    model: Optional[str] = None
    text: str
    layer: Optional[int] = -1
    head: Optional[int] = None


# What to say when a field has the wrong shape (pydantic lists one error per union member).
STRINGS = "a string or a list of strings"
SHAPES = {
    CompletionBody: {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
                     "stop": STRINGS},
    EmbeddingBody: {"input": STRINGS},
    FillMaskBody: {"inputs": STRINGS},
    TagBody: {"inputs": STRINGS},
    ClassifyBody: {"inputs": 'a string, or a list of strings or {"text", "text_pair"} objects'},
    QABody: {"inputs": 'a {"question", "context"} object or a list of them'},
}


def _message(err: ValidationError, body_cls: type[Body]) -> tuple[str, str | None]:
    """One line for the first problem of a pydantic error, and the field it is about. Inside a union,
    an unknown or missing key of an object is the likeliest mistake, so it is named first."""
    errors = err.errors()
    keyed = [e for e in errors if e["type"] == "extra_forbidden"] + [e for e in errors if e["type"] == "missing"]
    first = keyed[0] if keyed else errors[0]
    loc = first["loc"]
    field = str(loc[0]) if loc else None
    where = _where(loc)
    if first["type"] == "extra_forbidden":
        nested = [NESTED[n] for x in loc if isinstance(x, str) for n in NESTED if x == n or f"[{n}]" in x]
        valid = list((nested[-1] if nested else body_cls).model_fields) if len(loc) == 1 or nested else []
        return f"unknown field '{where}'{closest(str(loc[-1]), valid) if valid else ''}", field
    if first["type"] == "missing":
        return f"missing required field '{where}'", field
    shapes = SHAPES.get(body_cls, {})
    if field in shapes:
        return f"{field} must be {shapes[field]}, got {_show(first.get('input'))}", field
    return f"{_where(first['loc']) or 'body'}: {first['msg'].lower()}, got {_show(first.get('input'))}", field


NESTED = {"Pair": Pair, "Question": Question, "StreamOptions": StreamOptions}
_TYPE_TAGS = {"str", "int", "float", "bool", "none", *NESTED}


def _where(loc: tuple) -> str:
    """A pydantic error location as the field path (`inputs[2].text`), without its union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in part and "-" not in part:
            out += f".{part}" if out else part
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if value is not None else "null"
    return text if len(text) <= 60 else text[:57] + "..."


async def read_body(request: Request, body_cls: type[Body]) -> Body:
    """The request's JSON body as `body_cls`, or an ApiError saying exactly what is wrong with it."""
    limit = request.app.state.limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes (limits.max_body_bytes)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes (limits.max_body_bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8: byte 0x{raw[e.start]:02x} at position {e.start}") from None
    if not text.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    _check_strings(data, "")
    try:
        return body_cls.model_validate(data)
    except ValidationError as e:
        message, field = _message(e, body_cls)
        raise ApiError(400, message, param=field) from None


def _check_strings(value: Any, where: str) -> None:
    """JSON may escape lone surrogates (\\ud800), which are not text; refuse them by field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where or 'body'}: contains an unpaired surrogate escape; not valid Unicode text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{where}[{i}]")
