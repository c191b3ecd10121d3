"""One engine per served model: it owns the model, its queue and the one thread that runs it.

Routes hand an engine plain Python values (token ids, texts, sampling options) and get plain Python
values back; only the engine's thread touches tensors. The engine's loop, an asyncio task, goes round:

    answer health pings -> cancel what was disconnected or ran past its deadline -> run one group of
    queued jobs (embeddings, fill-mask, attention, task predictions: all queued jobs of one kind together)
    -> one decoding step for every running completion row -> admit waiting completions into free rows
    (prefilled together, they join the next step)

and sleeps when there is nothing to do. Model work runs on the engine's own single-thread executor, so
the event loop keeps serving HTTP (and noticing disconnects) while the model computes.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.serve.batcher import DecodeBatch, Emitted, Row, Sampling
from lmforge.serve.config import EngineOptions, Limits
from lmforge.serve.loading import load_model

log = logging.getLogger("lmforge.serve")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CONTEXT = 2048  # cache positions per row for a model without a fixed context (rotary positions)


class QueueFull(Exception):
    """The model's waiting queue is full; try again after `retry_after` seconds."""

    def __init__(self, model: str, limit: int, retry_after: int):
        super().__init__(f"model '{model}' has {limit} requests waiting (limits.max_queue); retry later")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is shutting down and takes no new work."""


class DeadlineExceeded(Exception):
    """The request ran past limits.deadline_s."""


class EngineFailed(Exception):
    """The model raised while running this request (a bug, or out of memory); other requests go on."""


# ---- requests ---------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """A completion request inside the engine: its rows (prompt x choice) and the events it receives:
    ("text", index, text, logprob | None), ("end", index, finish_reason, tokens), ("error", exc), ("done",)."""

    rows: list[Row]
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_row: int = 0  # rows before this one have been admitted
    open_rows: int = 0  # rows not yet ended
    cancelled: bool = False
    first_token: float | None = None
    generated: int = 0

    def __post_init__(self) -> None:
        self.open_rows = len(self.rows)


@dataclass
class Job:
    """A queued non-generation request: `kind` names the engine method that runs a group of them."""

    kind: str
    payload: Any
    deadline: float
    future: asyncio.Future
    cancelled: bool = False


class Engine:
    """Serves one model (see the module docstring).

    Args:
        name: the model's name in the API (`model` field of requests).
        source: where it was loaded from (run/checkpoint/transformers directory or a named source).
        device: where it runs.
        options: batching and cache options.
        limits: request limits (queue length, deadlines, input sizes).
        metrics: the server's `Metrics`.
    """

    def __init__(self, name: str, source: str, *, device: str = "cpu", options: EngineOptions = EngineOptions(),
                 limits: Limits = Limits(), metrics=None):
        self.name, self.source, self.options, self.limits, self.metrics = name, source, options, limits, metrics
        loaded = load_model(source, device)
        self.model, self.tokenizer, self.config = loaded["model"], loaded["tokenizer"], loaded["config"]
        self.predictor, self.capabilities, self.kind = loaded["predictor"], loaded["capabilities"], loaded["kind"]
        if self.model is not None and options.dtype != "fp32":
            self.model.to(DTYPES[options.dtype])
        self.max_len = self._context() if "completions" in self.capabilities else None
        self.batch = (DecodeBatch(self.model, self.tokenizer, options.max_batch, self.max_len)
                      if "completions" in self.capabilities else None)
        self.created = int(time.time())
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"lmforge-engine-{name}")
        self._waiting: deque[Generation] = deque()
        self._running: list[Generation] = []
        self._jobs: deque[Job] = deque()
        self._pings: list[asyncio.Future] = []
        self._drop: list[Row] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._stop = False
        self.last_error: str | None = None

    def _context(self) -> int:
        limit = getattr(self.model, "max_seq_len", None)
        wanted = self.options.max_model_len or limit or DEFAULT_CONTEXT
        if limit is not None and wanted > limit:
            raise ConfigError(f"engine.max_model_len {wanted} exceeds model '{self.name}''s context of {limit} tokens")
        return wanted

    def describe(self) -> dict[str, Any]:
        info = {"kind": self.kind, "capabilities": list(self.capabilities)}
        if self.max_len:
            info["context"] = self.max_len
        if self.predictor is not None:
            info["labels"] = list(self.predictor.labels)
        return info

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"engine-{self.name}")

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def ping(self, timeout: float) -> bool:
        """True when the loop comes round within `timeout` seconds (it answers between steps)."""
        if not self.alive:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._pings.append(fut)
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, grace: float) -> None:
        """Take no new work, let what is running finish for up to `grace` seconds, cancel the rest."""
        self._closing = True
        end = time.monotonic() + grace
        while self.alive and self._busy() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for gen in list(self._waiting) + list(self._running):
            self._fail(gen, ShuttingDown("the server shut down before this request finished"))
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server shut down before this request ran"))
        self._jobs.clear()
        self._stop = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _busy(self) -> bool:
        return bool(self._waiting or self._running or self._jobs)

    # ---- completions ------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str | list[int]], max_tokens: int) -> list[list[int]]:
        """Token ids of each prompt, checked against the vocabulary, the context and limits.max_input_tokens.
        An empty text prompt starts from the end-of-text token (an unconditional sample)."""
        vocab = self.model.config.vocab_size
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if p == "":
                    if self.tokenizer.eos_id is None:
                        raise ConfigError(f"prompt {i} is empty and the model has no end-of-text token to start from")
                    ids = [self.tokenizer.eos_id]
                else:
                    ids = self.tokenizer.encode(p)
                    if not ids:
                        raise ConfigError(f"prompt {i} encodes to no tokens")
            else:
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise ConfigError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
                ids = list(p)
            if len(ids) + max_tokens > self.max_len:
                room = self.max_len - len(ids)
                hint = f"lower max_tokens to {room}" if room > 0 else "shorten the prompt"
                raise ConfigError(f"prompt {i} has {len(ids)} tokens; with max_tokens {max_tokens} it exceeds model "
                                  f"'{self.name}''s context of {self.max_len} tokens: {hint}")
            out.append(ids)
        total = sum(len(ids) for ids in out)
        if total > self.limits.max_input_tokens:
            raise ConfigError(f"the prompts have {total} tokens; the limit is {self.limits.max_input_tokens} "
                              f"(limits.max_input_tokens)")
        return out

    def submit(self, prompts: list[list[int]], sampling: Sampling, n: int = 1, seed: int | None = None) -> Generation:
        """Queue a completion: `n` choices per prompt; choice k (OpenAI's index, prompt-major) samples with
        seed + k, or with a fresh random seed when `seed` is None."""
        self._admissible()
        if len(self._waiting) >= self.limits.max_queue:
            raise QueueFull(self.name, self.limits.max_queue, self._retry_after())
        rng = random.SystemRandom()
        rows = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                k = i * n + j
                s = replace(sampling, seed=(seed + k) if seed is not None else rng.randrange(2 ** 62))
                rows.append(Row(ids, s, index=k))
        gen = Generation(rows=rows, deadline=time.monotonic() + self.limits.deadline_s)
        for r in rows:
            r.owner = gen
        self._waiting.append(gen)
        self._gauges()
        self._wake.set()
        return gen

    def cancel(self, gen: Generation) -> None:
        """Stop a completion's work (its client went away); nobody else's is touched."""
        if gen.cancelled or (gen.open_rows == 0 and gen.next_row == len(gen.rows)):
            return
        gen.cancelled = True
        if self.metrics:
            self.metrics.cancelled.labels(self.name, "disconnect").inc()
        self._wake.set()

    def _running_rows(self) -> list[Row]:
        return self.batch.rows if self.batch is not None else []

    # ---- jobs -------------------------------------------------------------------------------------------
    def check_texts(self, texts: list[str]) -> int:
        """The input tokens of `texts` (limits.max_input_tokens applies to their sum)."""
        tokenizer = self.tokenizer if self.tokenizer is not None else self.predictor.tokenizer
        total = sum(len(ids) for ids in tokenizer.encode_batch(texts))
        if total > self.limits.max_input_tokens:
            raise ConfigError(f"the input has {total} tokens; the limit is {self.limits.max_input_tokens} "
                              f"(limits.max_input_tokens)")
        return total

    async def run_job(self, kind: str, payload: Any) -> Any:
        """Queue a job of `kind` (embed, fill_mask, attention, predict) and wait for its result."""
        self._admissible()
        if len(self._jobs) >= self.limits.max_queue:
            raise QueueFull(self.name, self.limits.max_queue, self._retry_after())
        loop = asyncio.get_running_loop()
        job = Job(kind, payload, time.monotonic() + self.limits.deadline_s, loop.create_future())
        self._jobs.append(job)
        self._gauges()
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), max(job.deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            job.cancelled = True
            raise DeadlineExceeded(f"the request took longer than {self.limits.deadline_s:g} s (limits.deadline_s)") from None
        except asyncio.CancelledError:
            job.cancelled = True  # the client went away
            raise

    def _admissible(self) -> None:
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if not self.alive:
            raise EngineFailed(f"model '{self.name}''s engine is not running ({self.last_error or 'stopped'})")

    def _retry_after(self) -> int:
        return 1

    # ---- the loop ---------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        try:
            await self._turns()
        except Exception as e:  # a bug in the loop itself: fail everything in flight; /healthz reports it
            log.exception("model '%s': the engine loop stopped", self.name)
            self.last_error = f"{type(e).__name__}: {e}"
            failed = EngineFailed(f"model '{self.name}''s engine stopped ({type(e).__name__})")
            for gen in list(self._waiting) + list(self._running):
                gen.events.put_nowait(("error", failed))
            for job in self._jobs:
                if not job.future.done():
                    job.future.set_exception(failed)
            raise

    async def _turns(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            for fut in self._pings:
                if not fut.done():
                    fut.set_result(True)
            self._pings.clear()
            self._expire()
            did = False
            if self._jobs:
                await self._run_jobs(loop)
                did = True
            if self.batch is not None:
                drop, self._drop = self._drop, []
                if self.batch.rows or drop:
                    did = True
                    if self.metrics and self.batch.rows:
                        self.metrics.batch_size.labels(self.name).observe(len(self.batch.rows) - len(drop))
                    await self._model_call(loop, self.batch.step, drop)
                groups = self._admit()
                if groups:
                    did = True
                    await self._model_call(loop, self.batch.add, groups)
            self._gauges()
            if not did:
                self._wake.clear()
                await self._wake.wait()

    async def _model_call(self, loop, fn, arg) -> None:
        """Run a batch call on the model thread and hand out what it produced. If it raises, the rows
        it involved fail (500) and the batch starts empty; the engine carries on."""
        try:
            emitted = await loop.run_in_executor(self._executor, fn, arg)
        except Exception as e:  # a bug or out of memory: fail the rows involved, not the server
            log.exception("model '%s': a batch step failed", self.name)
            self.last_error = f"{type(e).__name__}: {e}"
            rows = self.batch.rows + ([r for g in arg for r in g] if fn == self.batch.add else [])
            for gen in {id(r.owner): r.owner for r in rows}.values():
                self._fail(gen, EngineFailed(f"model '{self.name}' failed on this request ({type(e).__name__})"))
            self.batch.clear()
            return
        self._dispatch(emitted)

    def _dispatch(self, emitted: list[Emitted]) -> None:
        now = time.monotonic()
        for e in emitted:
            gen: Generation = e.row.owner
            if gen.cancelled or gen.events is None:
                continue
            if gen.first_token is None:
                gen.first_token = now
                if self.metrics:
                    self.metrics.ttft.labels(self.name).observe(now - gen.arrived)
            if e.text or e.logprob is not None:
                gen.events.put_nowait(("text", e.row.index, e.text, e.logprob))
            if e.finish_reason is not None:
                gen.generated += e.row.generated
                gen.events.put_nowait(("end", e.row.index, e.finish_reason, e.row.generated))
                gen.open_rows -= 1
                if gen.open_rows == 0:
                    self._finish(gen, now)
        if self.metrics:
            self.metrics.tokens.labels(self.name).inc(len(emitted))

    def _finish(self, gen: Generation, now: float) -> None:
        gen.events.put_nowait(("done",))
        if gen in self._running:
            self._running.remove(gen)
        if self.metrics and gen.first_token is not None and now > gen.first_token and gen.generated > 1:
            self.metrics.tokens_per_second.labels(self.name).observe((gen.generated - 1) / (now - gen.first_token))

    def _fail(self, gen: Generation, exc: Exception) -> None:
        """End a completion with an error: its queued rows never run, its running rows are dropped."""
        if gen in self._waiting:
            self._waiting.remove(gen)
        if gen in self._running:
            self._running.remove(gen)
        self._drop += [r for r in gen.rows if r in self.batch.rows]
        if not gen.cancelled:
            gen.events.put_nowait(("error", exc))
        gen.cancelled = True
        gen.next_row = len(gen.rows)

    def _expire(self) -> None:
        """Drop cancelled completions and fail those past their deadline."""
        now = time.monotonic()
        for gen in list(self._waiting) + list(self._running):
            if gen.cancelled:
                self._fail(gen, ShuttingDown("cancelled"))
            elif now > gen.deadline:
                if self.metrics:
                    self.metrics.cancelled.labels(self.name, "deadline").inc()
                self._fail(gen, DeadlineExceeded(
                    f"the request took longer than {self.limits.deadline_s:g} s (limits.deadline_s)"))
        for job in [j for j in self._jobs if j.cancelled or now > j.deadline]:
            self._jobs.remove(job)

    def _admit(self) -> list[list[Row]]:
        """Rows of waiting completions for the free rows of the batch, first come first served, grouped by
        prompt (a prompt's choices are prefilled once), up to engine.prefill_tokens prompt tokens per call
        (the first prompt always goes in; the rest wait for the next step)."""
        free, budget = self.batch.free, self.options.prefill_tokens
        groups: list[list[Row]] = []
        while self._waiting and free:
            gen = self._waiting[0]
            row = gen.rows[gen.next_row]
            if groups and groups[-1][0].owner is gen and groups[-1][0].prompt is row.prompt:
                groups[-1].append(row)
            elif groups and len(row.prompt) > budget:
                break
            else:
                budget -= len(row.prompt)
                groups.append([row])
            gen.next_row += 1
            free -= 1
            if gen not in self._running:
                self._running.append(gen)
            if gen.next_row == len(gen.rows):
                self._waiting.popleft()
        return groups

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(len(self._waiting) + len(self._jobs))
            self.metrics.running.labels(self.name).set(len(self._running_rows()))

    # ---- jobs on the model thread -----------------------------------------------------------------------
    async def _run_jobs(self, loop) -> None:
        kind = self._jobs[0].kind
        group: list[Job] = []
        while self._jobs and self._jobs[0].kind == kind and len(group) < self.options.job_batch:
            job = self._jobs.popleft()
            if not job.cancelled and not job.future.done():
                group.append(job)
        if not group:
            return
        if self.metrics:
            self.metrics.batch_size.labels(self.name).observe(len(group))
        try:
            results = await loop.run_in_executor(self._executor, getattr(self, f"_do_{kind}"),
                                                 [j.payload for j in group])
        except Exception as e:
            if not isinstance(e, LmforgeError):
                log.exception("model '%s': a %s job failed", self.name, kind)
                self.last_error = f"{type(e).__name__}: {e}"
                e = EngineFailed(f"model '{self.name}' failed on this request ({type(e).__name__})")
            results = [e] * len(group)
        for job, result in zip(group, results):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _each(self, fn, payloads: list) -> list:
        """fn(payload) for each payload; a user mistake in one fails that one only."""
        out = []
        for p in payloads:
            try:
                out.append(fn(p))
            except LmforgeError as e:
                out.append(e)
        return out

    @torch.inference_mode()
    def _do_embed(self, payloads: list[list[str]]) -> list[dict]:
        """Sentence embeddings of every payload's texts in one call; each text's token count and how
        many tokens were cut to fit the model (reported, never silent)."""
        from lmforge.recipes.embed import encode_sentences

        texts = [t for p in payloads for t in p]
        interop = self.config.get("interop") or {}
        max_length = interop.get("max_seq_length") or self.model.config.context_length
        pooling = (self.config.get("objective_args") or {}).get("pooling", "mean") \
            if self.config.get("objective") == "simcse" else "mean"
        # each text's whole length as the model would see it ([CLS] text [SEP]), before truncation
        lengths = [len(ids) for ids in self.tokenizer.encode_for_model(texts, padding=False)["input_ids"]]
        vectors = encode_sentences(self.model, self.tokenizer, texts, pooling=pooling, max_length=max_length,
                                   batch_size=self.options.job_batch).tolist()
        out, start = [], 0
        for p in payloads:
            span = range(start, start + len(p))
            out.append({"vectors": [vectors[i] for i in span],
                        "tokens": [min(lengths[i], max_length) for i in span],
                        "truncated": [max(lengths[i] - max_length, 0) for i in span]})
            start += len(p)
        return out

    @torch.inference_mode()
    def _do_fill_mask(self, payloads: list[tuple[list[str], int]]) -> list:
        from lmforge.recipes.fill_mask import predict_masks

        def one(p):
            texts, top_k = p
            return [[[{"token": tok, "id": i, "score": s} for tok, i, s in preds]
                     for preds in predict_masks(self.model, self.tokenizer, t, top_k)] for t in texts]
        return self._each(one, payloads)

    @torch.inference_mode()
    def _do_attention(self, payloads: list[tuple[str, int, int | None]]) -> list:
        from lmforge.recipes.attention import attention_matrix

        def one(p):
            text, layer, head = p
            matrix, labels, title = attention_matrix(self.model, self.tokenizer, text, layer=layer, head=head,
                                                     arch=self.config.get("arch"))
            return {"tokens": labels, "matrix": matrix.tolist(), "title": title}
        return self._each(one, payloads)

    @torch.inference_mode()
    def _do_predict(self, payloads: list[list[dict]]) -> list:
        """A task model's predictions for every payload's inputs in one call (one by one if that fails,
        so that a bad input fails its own request only)."""
        inputs = [x for p in payloads for x in p]
        try:
            preds = self.predictor.predict(inputs)
        except LmforgeError:
            if len(payloads) == 1:
                raise
            return self._each(self.predictor.predict, payloads)
        out, start = [], 0
        for p in payloads:
            out.append(preds[start:start + len(p)])
            start += len(p)
        return out
