"""Continuous batching over a KV cache: the completions being generated share one preallocated cache,
new ones join it between decoding steps, finished ones leave it, and every step decodes one token for
all of them in one forward pass.

Layout: cache row i holds the i-th running row (a prompt x choice). The rows are right-aligned: row i's
real tokens sit at positions [length - lens[i], length) of the shared cache length, the positions to
their left are padding that the attention mask hides. So a decoding step is the model's ordinary call
with a cache: one new token per row at position `length`, `attention_mask` (rows, length + 1) and
`position_ids` counting each row's own tokens. Joining rows are prefilled in a small cache of their own
(all new prompts in one left-padded call) and copied into free rows; leaving rows are replaced by moving
the last ones down, so the running rows are always rows [0, n) and a step computes nothing for free ones.
When the shared length reaches the end of the cache, or the common padding grows large, every row is
shifted left by the padding they all share.

A recurrent model (`LSTMLM`: rnn / gru / lstm) is batched the same way with nothing to align: its cache is
one state per row, (n_layer, rows, d_hidden), so joining copies the prefilled state into a free row and
a step feeds one token per row without any mask.

Sampling reuses `lmforge.generation`'s logit processors. Each row has its own `torch.Generator` seeded
from the request's seed and consumed only by that row's draws, so a seeded request gives the same tokens
whether it runs alone or in a batch (and the same as `generation.generate(..., seed=seed)` on that prompt).

Everything here runs on the engine's one model thread; nothing here knows about HTTP.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.generation import apply_repetition_penalty, top_k_filter, top_p_filter
from lmforge.models.layers import KVCache


@dataclass
class Sampling:
    """How one row picks its tokens (validated by the route before it gets here).

    Args:
        max_tokens: the most tokens to generate.
        temperature: 0 = greedy (argmax); otherwise sample from softmax(logits / temperature).
        top_p: nucleus mass (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        repetition_penalty: CTRL's penalty on tokens already in the prompt or output (1.0: off).
        seed: seeds this row's generator (required to sample; the engine draws one when the request has none).
        logprobs: None, or how many most likely alternatives to report per token (0..5).
        stop: strings that end the completion; the text is cut before the first one.
        ignore_eos: keep going past the end-of-text token (benchmarks: every completion max_tokens long).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


class Row:
    """One completion being generated: its prompt, its sampling, its tokens and its text so far.

    `push` takes each new token and returns the text that may be sent now: text that could still turn
    into a stop string, or an incomplete UTF-8 character (a trailing U+FFFD), is held back until it
    cannot. What was sent is always a prefix of the final text.
    """

    def __init__(self, prompt: list[int], sampling: Sampling, owner: Any = None, index: int = 0):
        self.prompt, self.sampling, self.owner, self.index = prompt, sampling, owner, index
        self.out: list[int] = []  # generated tokens, eos excluded
        self.generated = 0  # tokens sampled, eos included
        self.text = ""  # the completion's text so far
        self.sent = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # (V,) bool, for the repetition penalty
        self._longest_stop = max((len(s) for s in sampling.stop), default=0)

    def push(self, token: int, tokenizer: Any, eos_id: int | None) -> tuple[str, str | None]:
        """Add a sampled token; return (text to send now, finish reason or None)."""
        self.generated += 1
        if eos_id is not None and token == eos_id and not self.sampling.ignore_eos:
            return self._finish("stop")
        self.out.append(token)
        text = tokenizer.decode(self.out)
        if self.sampling.stop:
            start = max(0, self.sent - self._longest_stop)
            found = [i for i in (text.find(s, start) for s in self.sampling.stop) if i >= 0]
            if found:
                self.text = text[:min(found)]
                return self._finish("stop")
        self.text = text
        if len(self.out) >= self.sampling.max_tokens:
            return self._finish("length")
        safe = len(text) - self._held_back(text)
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, None

    def _held_back(self, text: str) -> int:
        """How many trailing characters may still change: an incomplete character, or a stop string's start."""
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.sampling.stop:
            for j in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:j]):
                    hold = j
                    break
        return hold

    def _finish(self, reason: str) -> tuple[str, str]:
        self.finish_reason = reason
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta, reason


@dataclass
class Emitted:
    """What one step produced for one row."""

    row: Row
    text: str  # text that may be sent now (possibly "")
    finish_reason: str | None
    logprob: dict | None = None  # {"token", "logprob", "top": {token: logprob}, "offset"} when asked for


class DecodeBatch:
    """The running rows of one model and their shared KV cache (see the module docstring).

    Args:
        model: a language model whose `new_cache` returns a `KVCache` (GPT) or a recurrent state with
            `state` tensors (n_layer, rows, d_hidden) (LSTMLM), in eval mode.
        tokenizer: its tokenizer (decodes the rows' text).
        max_rows: rows decoded together (the cache's batch size).
        max_len: cache positions; every row's prompt + completion must fit.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_rows: int, max_len: int):
        self.model, self.tokenizer = model, tokenizer
        self.cache = model.new_cache(max_rows, max_len)
        self.aligned = isinstance(self.cache, KVCache)  # a KV cache's rows share positions; a state's do not
        if not self.aligned and not hasattr(self.cache, "state"):
            raise TypeError(f"{type(model).__name__}: continuous batching needs a KVCache or a recurrent state")
        self.device = (self.cache.k[0] if self.aligned else self.cache.state[0]).device
        forward = inspect.signature(model.forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}  # only the last logits are used
        self.max_rows, self.max_len = max_rows, max_len
        self.rows: list[Row] = []
        self.lens: list[int] = []  # real tokens of each running row in the cache
        self.pending: list[int] = []  # each row's last sampled token, fed at the next step
        self.length = 0  # the shared cache length
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.pad_id = self.eos_id if self.eos_id is not None else 0
        self._positions = torch.arange(max_len + 1, device=self.device)

    @property
    def free(self) -> int:
        return self.max_rows - len(self.rows)

    def clear(self) -> None:
        """Forget every running row (after a failed call, when the cache's contents are unknown)."""
        self.rows, self.lens, self.pending, self.length = [], [], [], 0

    # ---- the two calls the engine makes --------------------------------------------------------------
    @torch.inference_mode()
    def add(self, groups: list[list[Row]]) -> list[Emitted]:
        """Prefill new rows and give each its first token. `groups`: rows sharing one prompt (the
        choices of a prompt: it is run once and its keys and values copied to each)."""
        rows = [r for g in groups for r in g]
        if not rows:
            return []
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} rows do not fit: {self.free} free")
        prompts = [g[0].prompt for g in groups]
        P = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (P - len(p)) + p for p in prompts], device=self.device)  # (U, P)
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        padded = any(len(p) < P for p in prompts)
        tmp = self.model.new_cache(len(prompts), P)
        logits = self.model(ids, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            attention_mask=mask if padded else None, cache=tmp, **self._extra)[:, -1].float()
        first, m = len(self.rows), len(rows)
        source = torch.tensor([u for u, g in enumerate(groups) for _ in g], device=self.device)
        if self.aligned:
            if self.length < P:  # the longest new prompt must fit left of the shared length
                self._shift(P - self.length)
            L = self.length
            for big, small in zip(self.cache.k + self.cache.v, tmp.k + tmp.v):
                big[first:first + m, :, L - P:L] = small.index_select(0, source)  # (m, n_head, P, head_dim)
        else:
            for big, small in zip(self.cache.state, tmp.state):
                big[:, first:first + m] = small.index_select(1, source)  # (n_layer, m, d_hidden)
        for r in rows:
            self._start(r)
        self.rows += rows
        self.lens += [len(r.prompt) for r in rows]
        self.pending += [0] * len(rows)
        return self._sample(logits.index_select(0, source), first)

    @torch.inference_mode()
    def step(self, drop: list[Row] = ()) -> list[Emitted]:
        """Remove the rows in `drop` (cancelled), then decode one token for every running row."""
        if drop:
            gone = {id(r) for r in drop}
            self._keep([i for i, r in enumerate(self.rows) if id(r) not in gone])
        n = len(self.rows)
        if n == 0:
            self.length = 0
            return []
        lens = torch.tensor(self.lens, device=self.device)
        tokens = torch.tensor(self.pending, device=self.device)[:, None]  # (n, 1)
        if self.aligned:
            common = self.length - max(self.lens)  # padding every row has on its left
            if self.length + 1 > self.max_len or common > self.length // 2:
                self._shift(-common)
            L = self.length
            mask = (self._positions[:L + 1][None, :] >= (L - lens)[:, None]).long()  # (n, L + 1): 1 = real token
            logits = self.model(tokens, position_ids=lens[:, None], attention_mask=mask, cache=self._view(n),
                                **self._extra)
        else:
            view = self._view(n)
            logits = self.model(tokens, position_ids=lens[:, None], cache=view, **self._extra)
            for big, new in zip(self.cache.state, view.state):  # the model hands back a new state
                big[:, :n] = new
        logits = logits[:, -1].float()  # (n, V)
        self.length += 1
        self.lens = [x + 1 for x in self.lens]
        return self._sample(logits, 0)

    # ---- sampling ---------------------------------------------------------------------------------------
    def _start(self, row: Row) -> None:
        s = row.sampling
        if s.temperature > 0:
            row.generator = torch.Generator(device=self.device)
            row.generator.manual_seed(s.seed)
        if s.repetition_penalty != 1.0:
            vocab = self.model.config.vocab_size
            row.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            row.seen[torch.tensor(row.prompt, device=self.device)] = True

    def _sample(self, logits: torch.Tensor, first: int) -> list[Emitted]:
        """Pick the next token of rows [first, first + len(logits)), hand each to its row, retire the
        finished rows. The processors are `generate`'s, applied in its order."""
        rows = self.rows[first:first + logits.size(0)]
        raw = logits
        penalised = [i for i, r in enumerate(rows) if r.seen is not None]
        if penalised:
            logits = logits.clone()
            for i in penalised:
                logits[i:i + 1] = apply_repetition_penalty(logits[i:i + 1], rows[i].seen[None],
                                                           rows[i].sampling.repetition_penalty)
        picked: dict[int, torch.Tensor] = {}
        greedy = [i for i, r in enumerate(rows) if r.sampling.temperature == 0]
        if greedy:
            idx = torch.tensor(greedy, device=self.device)
            for i, t in zip(greedy, logits.index_select(0, idx).argmax(-1)):
                picked[i] = t.view(1)
        groups: dict[tuple[float, int, float], list[int]] = {}
        for i, r in enumerate(rows):
            if r.sampling.temperature > 0:
                groups.setdefault((r.sampling.temperature, r.sampling.top_k, r.sampling.top_p), []).append(i)
        for (temperature, top_k, top_p), members in groups.items():
            sub = logits if len(members) == len(rows) else logits.index_select(0, torch.tensor(members, device=self.device))
            probs = top_p_filter(top_k_filter(sub / temperature, top_k), top_p).softmax(-1)  # (m, V)
            for j, i in enumerate(members):  # each row draws from its own generator only
                picked[i] = torch.multinomial(probs[j:j + 1], 1, generator=rows[i].generator)[0]
        tokens = torch.cat([picked[i] for i in range(len(rows))])
        chosen = tokens.tolist()  # the step's one host sync
        for i in penalised:
            rows[i].seen[chosen[i]] = True
        logprobs = self._logprobs(raw, tokens, rows)

        out = []
        for i, (row, token) in enumerate(zip(rows, chosen)):
            offset = len(row.text)
            text, finish = row.push(token, self.tokenizer, self.eos_id)
            if finish is None and self.lens[first + i] + 1 > self.max_len:  # no room to feed it
                text, finish = row._finish("length")
            lp = None
            if logprobs is not None and row.sampling.logprobs is not None:
                lp = dict(logprobs[i], offset=offset)
            out.append(Emitted(row, text, finish, lp))
            self.pending[first + i] = token
        if any(e.finish_reason for e in out):
            self._keep([i for i, r in enumerate(self.rows) if r.finish_reason is None])
        return out

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, rows: list[Row]) -> list[dict] | None:
        """Per row: the chosen token's log-probability under the model (before temperature and filters)
        and the `logprobs` most likely tokens' (OpenAI's completions `logprobs`)."""
        k = max((r.sampling.logprobs for r in rows if r.sampling.logprobs is not None), default=None)
        if k is None:
            return None
        logp = raw.log_softmax(-1)
        chosen = logp.gather(1, tokens[:, None])[:, 0].tolist()
        top_v, top_i = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
        decode = self.tokenizer.decode
        out = []
        for r, t, c, ti, tv in zip(rows, tokens.tolist(), chosen, top_i.tolist(), top_v.tolist()):
            want = r.sampling.logprobs or 0
            out.append({"token": decode([t]), "logprob": c, "top": {decode([j]): v for j, v in zip(ti[:want], tv[:want])}})
        return out

    # ---- cache bookkeeping ------------------------------------------------------------------------------
    def _view(self, n: int):
        """A cache over rows [0, n) of the shared one (views: a KV cache's writes land in place)."""
        if not self.aligned:
            view = copy.copy(self.cache)
            view.state = tuple(s[:, :n] for s in self.cache.state)
            return view
        view = KVCache(0, n, 0, 0, 0, device=self.device)
        view.k = [buf[:n] for buf in self.cache.k]
        view.v = [buf[:n] for buf in self.cache.v]
        view.length = self.length
        return view

    def _shift(self, d: int) -> None:
        """Move every running row's tokens d positions right (d > 0) or left (d < 0); the length follows."""
        n, L = len(self.rows), self.length
        if d == 0:
            return
        if n:
            keep = L - max(-d, 0)  # positions that survive the move
            src = slice(L - keep, L) if d < 0 else slice(0, L)
            for buf in self.cache.k + self.cache.v:
                moved = buf[:n, :, src].clone()
                buf[:n, :, src.start + d:src.stop + d] = moved
        self.length = L + d if n else max(L + d, 0)

    def _keep(self, index: list[int]) -> None:
        """Keep only rows `index` (in order), moved down to rows [0, len(index))."""
        if index == list(range(len(self.rows))):
            return
        n_new, L = len(index), self.length
        if n_new and index != list(range(n_new)):
            src = torch.tensor(index, device=self.device)
            if self.aligned:
                for buf in self.cache.k + self.cache.v:
                    buf[:n_new, :, :L] = buf[:, :, :L].index_select(0, src)
            else:
                for state in self.cache.state:
                    state[:, :n_new] = state.index_select(1, src)
        self.rows = [self.rows[i] for i in index]
        self.lens = [self.lens[i] for i in index]
        self.pending = [self.pending[i] for i in index]
        if not self.rows:
            self.length = 0
