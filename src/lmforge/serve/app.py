"""The FastAPI application: routes, the playground page, the API key, error answers, metrics, and the
engines' start and graceful stop.

    engines = build_engines(["gpt=runs/my-gpt", "minilm-l6"], device="cpu")
    app = build_app(engines, api_key=None)        # run it with uvicorn (lmforge serve does)

Every route is behind the API key when one is set: `Authorization: Bearer KEY` for the API, or HTTP
Basic auth with the key as password, which is what a browser asks for when it opens the playground
(its own requests then carry the same credentials).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import ConfigError, LmforgeError
from lmforge.serve.config import EngineOptions, Limits
from lmforge.serve.engine import DeadlineExceeded, Engine, EngineFailed, QueueFull, ShuttingDown
from lmforge.serve.metrics import Metrics
from lmforge.serve.bodies import ApiError
from lmforge.serve.routes import _ClientGone, error_of, router

log = logging.getLogger("lmforge.serve")
STATIC = Path(__file__).parent / "static"


def model_name(spec: str) -> tuple[str, str]:
    """(name, source) of a command-line model: NAME=SOURCE, or a source named after its directory
    (a checkpoint `runs/x/checkpoints/step-N` is `x-step-N`; a named source keeps its name)."""
    if "=" in spec and not Path(spec).exists():
        name, source = spec.split("=", 1)
        if not re.fullmatch(r"[\w.:-]+", name):
            raise ConfigError(f"model name {name!r} (in {spec!r}): use letters, digits, '.', ':', '_' and '-'")
        return name, source
    p = Path(spec)
    if not p.exists():
        return spec, spec
    p = p.resolve()
    if re.fullmatch(r"step-\d+", p.name) and p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}-{p.name}", spec
    return p.name, spec


def build_engines(models: list[str], *, device: str = "cpu", options: EngineOptions = EngineOptions(),
                  limits: Limits = Limits(), metrics: Metrics | None = None) -> dict[str, Engine]:
    """Load each model (NAME=SOURCE or SOURCE) into its engine; names must be unique."""
    if not models:
        raise ConfigError("give at least one model to serve (a run or checkpoint directory, a transformers directory, "
                          "or a named source such as minilm-l6)")
    specs = [model_name(m) for m in models]
    names = [n for n, _ in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"two models are named '{dup}'; name them apart with NAME=SOURCE")
    return {name: Engine(name, source, device=device, options=options, limits=limits, metrics=metrics)
            for name, source in specs}


class Guard:
    """Pure ASGI middleware around every route: the API key check and the request/error counters
    (it does not wrap streaming bodies, so disconnects reach the routes unchanged)."""

    def __init__(self, app, *, api_key: str | None, metrics: Metrics, routes: set[str]):
        self.app, self.api_key, self.metrics, self.routes = app, api_key, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.routes else ("/static" if path.startswith("/static/") else "other")
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and not self._authorized(scope):
                page = not path.startswith("/v1/") and path not in ("/healthz", "/metrics")
                challenge = 'Basic realm="lmforge", charset="UTF-8"' if page else "Bearer"
                error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                 type="authentication_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": challenge})
                await error.response()(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            code = str(status["code"])
            self.metrics.requests.labels(route, code).inc()
            if status["code"] >= 400:
                self.metrics.errors.labels(route, code).inc()

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                given = ""
        return hmac.compare_digest(given.encode("utf-8"), self.api_key.encode("utf-8"))


def build_app(engines: dict[str, Engine], *, api_key: str | None = None, limits: Limits = Limits(),
              metrics: Metrics | None = None, grace_s: float = 30.0, health_timeout_s: float = 10.0) -> FastAPI:
    """The server for `engines` (see the module docstring). Starting the app starts the engines' loops;
    stopping it lets in-flight work finish for up to `grace_s` seconds, then cancels the rest."""
    metrics = metrics or next((e.metrics for e in engines.values() if e.metrics), None) or Metrics()
    for e in engines.values():
        e.metrics = e.metrics or metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for e in engines.values():
            await e.start()
        try:
            yield
        finally:
            await asyncio.gather(*(e.stop(grace_s) for e in engines.values()))

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engines, app.state.limits, app.state.metrics = engines, limits, metrics
    app.state.health_timeout = health_timeout_s
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone):
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; the API is under /v1 (see /v1/models)"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    async def _known(request: Request, exc: Exception):  # user mistakes and engine states: no traceback
        return error_of(exc).response()

    for known in (LmforgeError, QueueFull, ShuttingDown, DeadlineExceeded, EngineFailed):
        app.add_exception_handler(known, _known)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug: answered 500, and the traceback is logged
        return error_of(exc).response()

    routes = {r.path for r in router.routes} | {"/", "/openapi.json"}
    app.add_middleware(Guard, api_key=api_key, metrics=metrics, routes=routes)
    return app
