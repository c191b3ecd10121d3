"""`lmforge serve`: one OpenAI-compatible HTTP server for every lmforge model, with a playground at `/`.

Build (load each model into its engine), run (uvicorn until Ctrl-C or SIGTERM, then a graceful stop:
requests in flight get `grace_s` seconds to finish, the rest are cancelled).
"""
from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Literal, Optional

from lmforge.errors import ConfigError, DataError
from lmforge.serve.config import EngineOptions, Limits


def serve(
    models: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    api_key_file: Optional[str] = None,
    device: str = "auto",
    limits: Limits = Limits(),
    engine: EngineOptions = EngineOptions(),
    grace_s: float = 30.0,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Serve models over HTTP: completions, embeddings, fill-mask, classify, tag, qa, attention.

    Args:
        models: what to serve: run or checkpoint directories, transformers directories or named sources
            (minilm-l6); NAME=SOURCE picks the name requests use (default: the directory's name).
        host: the address to bind; the default serves this machine only (loopback).
        port: the TCP port.
        api_key: when set, every route needs `Authorization: Bearer KEY` (browsers: Basic auth, key as password).
        api_key_file: read the API key from this file instead (keeps it out of the process list).
        device: 'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...
        limits: request limits (`--limits.max_tokens 512 --limits.max_queue 64 ...`).
        engine: batching options (`--engine.max_batch 64`; 1 turns batching off).
        grace_s: on shutdown, seconds in-flight requests get to finish before they are cancelled.
        log_level: uvicorn's log level.
    """
    import torch
    import uvicorn

    from lmforge.serve.app import build_app, build_engines
    from lmforge.serve.metrics import Metrics

    key = _api_key(api_key, api_key_file)
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    if grace_s < 0:
        raise ConfigError(f"grace_s must be >= 0, got {grace_s}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: '{device}' is not a device (try 'auto', 'cpu', 'cuda')") from None
    metrics = Metrics()
    engines = build_engines(models, device=device, options=engine, limits=limits, metrics=metrics)
    app = build_app(engines, api_key=key, limits=limits, metrics=metrics, grace_s=grace_s,
                    health_timeout_s=engine.health_timeout_s)
    if key is None and not _loopback(host):
        print(f"lmforge serve: warning: binding {host} without an API key: anyone who can reach this machine "
              f"can use the models (set --api_key_file)", file=sys.stderr)
    for e in engines.values():
        print(f"  {e.name}: {e.kind} from {e.source} ({', '.join(e.capabilities)})", flush=True)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {len(engines)} model(s) on http://{shown}:{port} (playground: http://{shown}:{port}/)", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace_s,
                            access_log=log_level == "debug")
    uvicorn.Server(config).run()


def _api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    if api_key is not None and api_key_file is not None:
        raise ConfigError("give --api_key or --api_key_file, not both")
    if api_key_file is not None:
        path = Path(api_key_file)
        if not path.is_file():
            raise DataError(f"{path}: API key file not found")
        api_key = path.read_text(encoding="utf-8").strip()
        if not api_key:
            raise DataError(f"{path}: the API key file is empty")
    if api_key is not None and (not api_key or any(c.isspace() for c in api_key)):
        raise ConfigError("the API key must be non-empty and hold no spaces")
    return api_key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
