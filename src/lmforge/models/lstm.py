"""An LSTM language model: the recurrent baseline that neural language modelling started from.

Embedding -> dropout -> a stack of `n_layer` LSTMs (`torch.nn.LSTM`, cuDNN on GPU, dropout between
layers) -> dropout -> [projection to d_model when tying needs it] -> decoder to the vocabulary.
Zaremba et al. 2014 ("Recurrent Neural Network Regularization") and the PyTorch word_language_model
example; weight tying as Press & Wolf 2017 / Inan et al. 2017.

It speaks the same interface as the GPT so that the CLM objective and `lmforge.generation.generate`
work unchanged: `model(input_ids)` -> logits (B, T, vocab); `new_cache(...)` gives a recurrent-state
cache that `forward` updates in place, with `reorder(index)` for beam search; padded positions
(attention_mask == 0, e.g. a left-padded prompt) leave the state unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError


@dataclass
class LSTMConfig:
    """Shape of an LSTM language model.

    Args:
        vocab_size: tokenizer vocabulary size.
        d_model: embedding size (and the decoder's input size when embeddings are tied).
        d_hidden: LSTM hidden (and cell) state size.
        n_layer: stacked LSTM layers.
        dropout: dropout on the embeddings, between LSTM layers and before the decoder.
        tie_embeddings: share the input embedding with the output decoder; when d_hidden != d_model a
            linear projection d_hidden -> d_model is added before the decoder.
        init_range: embeddings (and an untied decoder) start uniform in [-init_range, init_range].
    """

    vocab_size: int = 8000
    d_model: int = 256
    d_hidden: int = 512
    n_layer: int = 2
    dropout: float = 0.2
    tie_embeddings: bool = True
    init_range: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_hidden", "n_layer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_range <= 0:
            raise ConfigError(f"model.init_range must be positive, got {self.init_range}")


class LSTMCache:
    """The recurrent state (h, c), each (n_layer, B, d_hidden), after the tokens fed so far.
    Unlike a KV cache it does not grow: `max_len` is not needed and only `length` is counted."""

    def __init__(self, n_layer: int, batch_size: int, d_hidden: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        self.h = torch.zeros(n_layer, batch_size, d_hidden, dtype=dtype, device=device)
        self.c = torch.zeros(n_layer, batch_size, d_hidden, dtype=dtype, device=device)
        self.length = 0  # tokens fed so far (padding included)

    @property
    def batch_size(self) -> int:
        return self.h.size(1)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (beam search)."""
        self.h = self.h.index_select(1, index)
        self.c = self.c.index_select(1, index)

    def reset(self) -> None:
        self.h.zero_()
        self.c.zero_()
        self.length = 0


class LSTMLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    max_seq_len = None  # no fixed context: the state carries everything seen so far

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = cfg = config
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_hidden, num_layers=cfg.n_layer, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        d_out = cfg.d_model if cfg.tie_embeddings else cfg.d_hidden
        self.proj = nn.Linear(cfg.d_hidden, cfg.d_model) if d_out != cfg.d_hidden else None
        self.decoder = nn.Linear(d_out, cfg.vocab_size)
        nn.init.uniform_(self.embedding.weight, -cfg.init_range, cfg.init_range)
        nn.init.zeros_(self.decoder.bias)
        if cfg.tie_embeddings:
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -cfg.init_range, cfg.init_range)

    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> LSTMCache:
        """An all-zero state for `batch_size` rows (`max_len` is accepted for the generation protocol)."""
        p = self.embedding.weight
        return LSTMCache(self.config.n_layer, batch_size, self.config.d_hidden,
                         dtype=dtype or p.dtype, device=device if device is not None else p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LSTMCache | None = None,
        output_attentions: bool = False,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            input_ids: (B, T) token ids (the new tokens only when a cache is given).
            position_ids: ignored (an LSTM knows order from the recurrence); accepted for the protocol.
            attention_mask: (B, T) or (B, cached + T), 1 = real token, 0 = padding; the state is carried
                unchanged across padded positions (their logits are meaningless).
            cache: a `new_cache(...)`: the starting state, replaced by the final state in place.
            output_attentions: not supported (an LSTM has no attention).
        """
        if output_attentions:
            raise ConfigError("the LSTM has no attention weights (use a bert or gpt model)")
        B, T = input_ids.shape
        state = None
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} rows, input has {B}")
            state = (cache.h, cache.c)
        step_mask = None
        if attention_mask is not None:
            step_mask = attention_mask[:, -T:].bool()  # (B, T): the new tokens' columns
            if bool(step_mask.all()):
                step_mask = None
        x = self.drop(self.embedding(input_ids))  # (B, T, d_model)
        if step_mask is None:
            out, state = self.lstm(x, state)  # (B, T, d_hidden); whole sequence in one cuDNN call
        else:
            out, state = self._masked(x, state, step_mask)
        if cache is not None:
            cache.h, cache.c = state
            cache.length += T
        out = self.drop(out)
        if self.proj is not None:
            out = self.proj(out)
        return self.decoder(out)  # (B, T, vocab)

    def _masked(self, x: torch.Tensor, state, step_mask: torch.Tensor):
        """One step at a time, keeping a row's state where its token is padding (prompt prefill only)."""
        B, T, _ = x.shape
        if state is None:
            zeros = x.new_zeros(self.config.n_layer, B, self.config.d_hidden)
            state = (zeros, zeros)
        h, c = state
        outs = []
        for t in range(T):
            o, (h_new, c_new) = self.lstm(x[:, t : t + 1], (h, c))
            keep = step_mask[:, t].view(1, B, 1)
            h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            outs.append(o)
        return torch.cat(outs, dim=1), (h, c)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, tied weights once (`non_embedding` is accepted for symmetry with GPT; an
        LSTM has no position table to leave out)."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        c = self.config
        tie = "tied" if c.tie_embeddings else "untied"
        return (f"LSTM LM: {self.num_params() / 1e6:.2f}M parameters ({c.n_layer} layers, d_model {c.d_model}, "
                f"d_hidden {c.d_hidden}, {tie} embeddings)")
