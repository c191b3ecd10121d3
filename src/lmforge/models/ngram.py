"""An n-gram language model with interpolated Kneser-Ney smoothing: the statistical rung of the ladder.

Trained by counting (NumPy over the token array, a few seconds for millions of tokens), scored and
sampled through the same interface as the neural models: `model(input_ids)` -> next-token logits
(B, T, vocab), here the log-probabilities themselves, so the CLM objective's cross-entropy is the model's
nats per token.

The smoothing is interpolated Kneser-Ney as Chen & Goodman define it ("An Empirical Study of Smoothing
Techniques for Language Modeling", 1998, section 3.5; the form KenLM and SRILM `-kndiscount -interpolate`
estimate). For an order-N model, with h a context of k-1 tokens and h' the same context without its
first token:

    p_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / S_k(h)  +  gamma_k(h) p_{k-1}(w | h')
    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3 N3+(h .)) / S_k(h),   S_k(h) = sum_w c_k(h w)
    p_0(w)     = 1 / vocab_size,   and p_k(w | h) = p_{k-1}(w | h') when S_k(h) = 0 (h never seen)

c_N is the raw count; for k < N, c_k(x) = N1+(. x), the number of distinct tokens seen before x (the
continuation count that is Kneser-Ney's idea). N_j(h .) is the number of tokens w with c_k(h w) = j (3+:
at least 3). The discounts of each order come from its count-of-counts n_1..n_4:
Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3 ('modified_kn'), or one
discount Y for every count ('kn'). On degenerate counts (tiny corpora) a discount that is undefined or
outside (0, j] falls back to Y (0.5 when there are no singletons), so that every token of the
vocabulary keeps a positive probability and each distribution sums to 1.

A context shorter than N-1 tokens (the start of a text, or after padding) uses the highest order it
fills. Tables are sorted int64 keys (an n-gram x1..xk is sum_i x_i V^(k-i)), so lookups are binary
searches and a context's continuations are one contiguous run; this needs vocab_size**order < 2**63.
No maintained library fits: KenLM's estimator is a compiled binary (`lmplz`) and NLTK's `lm` is pure
Python, far too slow for tens of millions of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from lmforge.errors import ConfigError


@dataclass
class NGramConfig:
    """An n-gram model's order, smoothing and (after counting) table sizes.

    Args:
        vocab_size: tokenizer vocabulary size (every id below it gets a probability).
        order: N, the longest n-gram (N-1 tokens of context); 1 is a unigram model.
        smoothing: 'modified_kn' (three discounts per order, Chen & Goodman) or 'kn' (one per order).
        ngrams: n-grams stored per order 1..N (filled by counting; sizes the tables when loading).
        contexts: distinct contexts stored per order 1..N (filled by counting).
    """

    vocab_size: int = 8000
    order: int = 3
    smoothing: Literal["modified_kn", "kn"] = "modified_kn"
    ngrams: list[int] = field(default_factory=list)
    contexts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.order < 1:
            raise ConfigError(f"model.order must be at least 1 (1 = unigram), got {self.order}")
        if self.vocab_size < 1:
            raise ConfigError(f"model.vocab_size must be at least 1, got {self.vocab_size}")
        if self.vocab_size ** self.order >= 2**63:
            top = max(k for k in range(1, self.order) if self.vocab_size ** k < 2**63)
            raise ConfigError(f"model.order={self.order} is too high for vocab_size {self.vocab_size}: n-gram keys "
                              f"need vocab_size**order < 2**63; the highest order for this vocabulary is {top}")
        if self.smoothing not in ("modified_kn", "kn"):
            raise ConfigError(f"model.smoothing must be 'modified_kn' or 'kn', got {self.smoothing!r}")
        for name in ("ngrams", "contexts"):
            sizes = getattr(self, name)
            if sizes and (len(sizes) != self.order or min(sizes) < 0):
                raise ConfigError(f"model.{name} must list {self.order} non-negative table sizes, got {sizes}")


# ---- counting ---------------------------------------------------------------------------------------------
def _ngram_keys(tokens: np.ndarray, k: int, V: int) -> np.ndarray:
    """Keys of every k-gram occurrence: x1..xk -> sum_i x_i V^(k-i) (int64)."""
    n = len(tokens) - k + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    key = tokens[:n].astype(np.int64)
    for j in range(1, k):
        key = key * V + tokens[j:j + n]
    return key


def _discounts(counts: np.ndarray, smoothing: str) -> np.ndarray:
    """(D1, D2, D3+) from the count-of-counts (see the module docstring for the fallbacks)."""
    n = [int(np.count_nonzero(counts == j)) for j in (1, 2, 3, 4)]
    y = n[0] / (n[0] + 2 * n[1]) if n[0] > 0 else 0.5
    if smoothing == "kn":
        return np.full(3, y)
    out = np.full(3, y)
    for j in (1, 2, 3):
        if n[j - 1] > 0:
            d = j - (j + 1) * y * n[j] / n[j - 1]
            if 0 < d <= j:
                out[j - 1] = d
    return out


def count_tables(tokens: np.ndarray, vocab_size: int, order: int, smoothing: str = "modified_kn") -> list[dict]:
    """The smoothed tables of an order-`order` model counted from one token array, for orders 1..N:
    {'keys': sorted n-gram keys, 'probs': their discounted probabilities, 'contexts': sorted context keys,
    'backoff': gamma of each context, 'discounts': (D1, D2, D3+)}."""
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ConfigError(f"token id {int(tokens.max())} is >= model.vocab_size {vocab_size}")
    V = vocab_size
    tokens = tokens.astype(np.int64)
    tables = []
    higher_types = None  # distinct (k+1)-grams of the corpus, for the continuation counts of order k
    for k in range(order, 0, -1):
        if k == order:
            keys, counts = np.unique(_ngram_keys(tokens, k, V), return_counts=True)
        else:  # c_k(x) = N1+(. x): how many distinct (k+1)-grams end with x
            keys, counts = np.unique(higher_types % V**k, return_counts=True)
        if k > 1:  # the raw k-gram types, for order k-1's continuation counts
            higher_types = keys if k == order else np.unique(_ngram_keys(tokens, k, V))
        tables.append(_smooth(keys, counts, V, smoothing))
    return tables[::-1]


def _smooth(keys: np.ndarray, counts: np.ndarray, V: int, smoothing: str) -> dict:
    """One order's table: discounted probabilities per n-gram and the back-off weight gamma per context."""
    disc = _discounts(counts, smoothing)
    contexts, starts = np.unique(keys // V, return_index=True)  # sorted keys come grouped by context

    def per_context(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x.astype(np.int64), starts) if len(x) else np.zeros(0, dtype=np.int64)

    total = per_context(counts).astype(np.float64)  # S(h)
    backoff = (disc[0] * per_context(counts == 1) + disc[1] * per_context(counts == 2)
               + disc[2] * per_context(counts >= 3)) / np.maximum(total, 1)
    total_of_key = np.repeat(total, np.diff(np.append(starts, len(keys))))
    probs = np.maximum(counts - disc[np.minimum(counts, 3) - 1], 0.0) / np.maximum(total_of_key, 1)
    return {"keys": keys, "probs": probs, "contexts": contexts, "backoff": backoff, "discounts": disc}


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] in float64 (zeros when the table is empty: its lookups are never 'found')."""
    if values.numel() == 0:
        return torch.zeros(index.shape, dtype=torch.float64, device=index.device)
    return values[index].double()


# ---- the model ----------------------------------------------------------------------------------------------
class NGramCache:
    """The last N-1 positions of each row (tokens, and whether each is a real token), all an n-gram model
    needs to continue; `reorder(index)` for beam search."""

    def __init__(self, batch_size: int, history: int, device: torch.device | str | None = None):
        self.tokens = torch.zeros(batch_size, history, dtype=torch.long, device=device)
        self.real = torch.zeros(batch_size, history, dtype=torch.bool, device=device)
        self.length = 0  # tokens fed so far (padding included)

    @property
    def batch_size(self) -> int:
        return self.tokens.size(0)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i]."""
        self.tokens, self.real = self.tokens[index], self.real[index]


class NGramLM(nn.Module):
    """Token ids (B, T) -> log p(next token) (B, T, vocab_size) from Kneser-Ney smoothed n-gram tables.

    The tables are buffers (`keys_k`, `probs_k`, `contexts_k`, `backoff_k` for k = 1..N, and `discounts`),
    so a checkpoint is the usual `model.safetensors`; the model has no trainable parameters.
    """

    max_seq_len = None  # any length: only the last N-1 tokens matter

    def __init__(self, config: NGramConfig):
        super().__init__()
        self.config = cfg = config
        ngrams = cfg.ngrams or [0] * cfg.order
        contexts = cfg.contexts or [0] * cfg.order
        for k in range(1, cfg.order + 1):
            self.register_buffer(f"keys_{k}", torch.zeros(ngrams[k - 1], dtype=torch.long))
            self.register_buffer(f"probs_{k}", torch.zeros(ngrams[k - 1], dtype=torch.float32))
            self.register_buffer(f"contexts_{k}", torch.zeros(contexts[k - 1], dtype=torch.long))
            self.register_buffer(f"backoff_{k}", torch.zeros(contexts[k - 1], dtype=torch.float32))
        self.register_buffer("discounts", torch.zeros(cfg.order, 3, dtype=torch.float64))

    @classmethod
    def count(cls, tokens: np.ndarray, config: NGramConfig) -> "NGramLM":
        """Count `tokens` (a 1-D array of ids, e.g. a prepared train split) into a smoothed model."""
        tables = count_tables(tokens, config.vocab_size, config.order, config.smoothing)
        cfg = NGramConfig(vocab_size=config.vocab_size, order=config.order, smoothing=config.smoothing,
                          ngrams=[len(t["keys"]) for t in tables], contexts=[len(t["contexts"]) for t in tables])
        model = cls(cfg)
        for k, t in enumerate(tables, start=1):
            getattr(model, f"keys_{k}").copy_(torch.from_numpy(t["keys"]))
            getattr(model, f"probs_{k}").copy_(torch.from_numpy(t["probs"]))
            getattr(model, f"contexts_{k}").copy_(torch.from_numpy(t["contexts"]))
            getattr(model, f"backoff_{k}").copy_(torch.from_numpy(t["backoff"]))
            model.discounts[k - 1] = torch.from_numpy(t["discounts"])
        return model.eval()

    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> NGramCache:
        """Room for the last N-1 tokens of `batch_size` rows (`max_len`, `dtype` accepted for the protocol)."""
        return NGramCache(batch_size, self.config.order - 1, device=device if device is not None else self.keys_1.device)

    # -- the context keys of every position ---------------------------------------------------------------------
    def _contexts(self, input_ids, attention_mask, cache, keep: int | None):
        """(context keys per order, each (B, P), and usable-order masks) for the last P positions to predict."""
        N, V = self.config.order, self.config.vocab_size
        B, T = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, -T:].bool()
        seq = input_ids
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} rows, input has {B}")
            seq, real = torch.cat([cache.tokens, seq], 1), torch.cat([cache.real, real], 1)
            cache.tokens, cache.real = seq[:, seq.size(1) - (N - 1):], real[:, real.size(1) - (N - 1):]
            cache.length += T
        L = seq.size(1)
        # avail[t]: real tokens in a row ending at t (the context a prediction at t may use)
        idx = torch.arange(L, device=seq.device).expand(B, L)
        last_pad = torch.where(real, torch.full_like(idx, -1), idx).cummax(1).values
        avail = idx - last_pad  # (B, L); 0 where t itself is padding
        P = T if keep is None else min(keep, T)
        keys = [torch.zeros(B, P, dtype=torch.long, device=seq.device)]  # order 1: the empty context
        run = torch.zeros_like(seq)
        for k in range(2, N + 1):  # order k: the k-1 tokens ending at t
            prev = torch.cat([run.new_zeros(B, 1), run[:, :-1]], 1)
            run = prev * V + seq if k > 2 else seq.clone()
            keys.append(run[:, L - P:].contiguous())
        usable = [avail[:, L - P:] >= k - 1 for k in range(1, N + 1)]  # order 1 (no context): always
        usable[0] = torch.ones_like(usable[0])
        return keys, usable

    def _lookup(self, table: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(found, index) of `query` values in a sorted 1-D `table`."""
        if table.numel() == 0:
            return torch.zeros_like(query, dtype=torch.bool), torch.zeros_like(query)
        i = torch.searchsorted(table, query).clamp(max=table.numel() - 1)
        return table[i] == query, i

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: NGramCache | None = None,
        logits_to_keep: int | None = None,
        output_attentions: bool = False,
    ) -> torch.Tensor:
        """log p(next token | up to N-1 previous real tokens) at each position: (B, T, vocab) float32.

        Args:
            input_ids: (B, T) token ids (the new tokens only when a cache is given).
            position_ids: ignored; accepted for the generation protocol.
            attention_mask: (B, T) or (B, cached + T), 1 = real token, 0 = padding; a context never
                reaches across padding (the logits at padded positions are meaningless).
            cache: a `new_cache(...)`: the previous tokens, updated in place.
            logits_to_keep: only the last this many positions (generation asks for 1).
            output_attentions: not supported (an n-gram model has no attention).
        """
        if output_attentions:
            raise ConfigError("an n-gram model has no attention weights (use a bert or gpt model)")
        device = input_ids.device
        input_ids = input_ids.to(self.keys_1.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.keys_1.device)
        keys, usable = self._contexts(input_ids, attention_mask, cache, logits_to_keep)
        B, P = keys[0].shape
        V = self.config.vocab_size
        p = torch.full((B * P, V), 1.0 / V, dtype=torch.float64, device=input_ids.device)
        for k in range(1, self.config.order + 1):
            ctx = keys[k - 1].reshape(-1)
            found, i = self._lookup(getattr(self, f"contexts_{k}"), ctx)
            found &= usable[k - 1].reshape(-1)
            rows = found.nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            gamma = getattr(self, f"backoff_{k}")[i[rows]].double()
            p[rows] *= gamma[:, None]
            # the context's continuations are the contiguous run of keys in [ctx*V, ctx*V + V)
            table = getattr(self, f"keys_{k}")
            lo = torch.searchsorted(table, ctx[rows] * V)
            hi = torch.searchsorted(table, ctx[rows] * V + V)
            n = hi - lo
            at = torch.repeat_interleave(rows, n)
            j = torch.arange(int(n.sum()), device=p.device) - torch.repeat_interleave(n.cumsum(0) - n, n) \
                + torch.repeat_interleave(lo, n)
            p[at, table[j] % V] += getattr(self, f"probs_{k}")[j].double()
        return p.log().float().view(B, P, V).to(device)

    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """log p(targets[b, t] | input_ids[b, :t + 1]) (B, T) float64, without building the whole
        distribution (what scoring a validation split needs: O(N) lookups per token)."""
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match input_ids {tuple(input_ids.shape)}")
        keys, usable = self._contexts(input_ids, attention_mask, None, None)
        V = self.config.vocab_size
        p = torch.full(targets.shape, 1.0 / V, dtype=torch.float64, device=targets.device)
        for k in range(1, self.config.order + 1):
            found, i = self._lookup(getattr(self, f"contexts_{k}"), keys[k - 1])
            found &= usable[k - 1]
            seen, j = self._lookup(getattr(self, f"keys_{k}"), keys[k - 1] * V + targets)
            alpha = torch.where(seen, _take(getattr(self, f"probs_{k}"), j), 0.0)
            p = torch.where(found, _take(getattr(self, f"backoff_{k}"), i) * p + alpha, p)
        return p.log()

    def num_params(self, non_embedding: bool = True) -> int:
        """Numbers stored: one probability per n-gram and one back-off weight per context."""
        return sum(self.config.ngrams or [0]) + sum(self.config.contexts or [0])

    def describe(self) -> str:
        c = self.config
        kind = "modified Kneser-Ney" if c.smoothing == "modified_kn" else "Kneser-Ney"
        return (f"n-gram LM: order {c.order}, interpolated {kind}, {sum(c.ngrams or [0]) / 1e6:.2f}M n-grams, "
                f"{sum(c.contexts or [0]) / 1e6:.2f}M contexts")
