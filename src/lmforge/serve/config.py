"""The server's two knobs sections, set from the command line like every other verb's
(`--limits.max_tokens 512`, `--engine.max_batch 64`) or from a YAML file (`--config serve.yaml`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.errors import ConfigError


@dataclass
class Limits:
    """What one request may ask for; a request over a limit is answered 4xx with the limit's name.

    Args:
        max_body_bytes: the largest request body (413 beyond).
        max_inputs: prompts, sentences or texts in one request.
        max_input_tokens: input tokens in one request, summed over its prompts or texts.
        max_tokens: the largest `max_tokens` a completion may ask for.
        max_n: the largest `n` (choices per prompt) a completion may ask for.
        max_queue: requests waiting per model (not yet running); one more is answered 429 with Retry-After.
        deadline_s: seconds a request may take from arrival to its last byte; past it the work is
            cancelled and the request answered 504 (a stream ends with an error event).
    """

    max_body_bytes: int = 1 << 20
    max_inputs: int = 64
    max_input_tokens: int = 16384
    max_tokens: int = 1024
    max_n: int = 8
    max_queue: int = 256
    deadline_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_input_tokens", "max_tokens", "max_n", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"limits.{name} must be a positive integer, got {value!r}")
        if not self.deadline_s > 0:
            raise ConfigError(f"limits.deadline_s must be positive, got {self.deadline_s!r}")


@dataclass
class EngineOptions:
    """How each model's engine runs it.

    Args:
        max_batch: completion rows (prompt x choice) decoded together; new requests join the running
            batch between decoding steps. 1 turns batching off (one row at a time, first come first served).
        max_model_len: KV-cache positions per row (prompt + completion); default: the model's context
            (2048 for a model without a fixed one, e.g. rotary positions).
        prefill_tokens: prompt tokens prefilled in one call; more joining prompts wait for the next step. It
            bounds how long one call holds up the running rows' next token (and /healthz's answer).
        dtype: weights and KV cache in fp32 (as trained), or bf16 / fp16 (GPU).
        job_batch: texts run together for embeddings, fill-mask and task models.
        health_timeout_s: /healthz reports an engine unresponsive when its loop has not come round in this
            long (between two model calls; a single call longer than this reads as stuck).
    """

    max_batch: int = 32
    max_model_len: Optional[int] = None
    prefill_tokens: int = 4096
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    job_batch: int = 64
    health_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"engine.max_batch must be a positive integer, got {self.max_batch!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"engine.max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.prefill_tokens, int) or self.prefill_tokens < 1:
            raise ConfigError(f"engine.prefill_tokens must be a positive integer, got {self.prefill_tokens!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"engine.dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if not isinstance(self.job_batch, int) or self.job_batch < 1:
            raise ConfigError(f"engine.job_batch must be a positive integer, got {self.job_batch!r}")
        if not self.health_timeout_s > 0:
            raise ConfigError(f"engine.health_timeout_s must be positive, got {self.health_timeout_s!r}")
