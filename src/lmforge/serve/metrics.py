"""The server's Prometheus metrics (`GET /metrics`), in a registry of their own so that several
servers can live in one process (tests) without sharing counts."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests and errors by route and status, and per model: queue depth, running rows, rows or texts
    per batch, time to first token, generated tokens (rate() of it is the tokens/s), each completion's
    decoding speed, and cancelled work by reason."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.errors = Counter("lmforge_request_errors", "HTTP requests answered with an error (4xx/5xx)",
                              ["route", "status"], registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "requests waiting for the model", ["model"], registry=r)
        self.running = Gauge("lmforge_running_rows", "completion rows in the running batch", ["model"], registry=r)
        self.batch_size = Histogram("lmforge_batch_size", "rows per decoding step, or texts per job batch", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "arrival to first generated token", ["model"],
                              buckets=_SECONDS, registry=r)
        self.tokens = Counter("lmforge_generated_tokens", "tokens generated", ["model"], registry=r)
        self.tokens_per_second = Histogram("lmforge_completion_tokens_per_second",
                                           "decoding speed of each completion after its first token", ["model"],
                                           buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r)
        self.cancelled = Counter("lmforge_cancelled", "requests whose work was cancelled, by reason",
                                 ["model", "reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
