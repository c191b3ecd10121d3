"""A recurrent language model: the neural baseline that language modelling started from, with the
cell as a choice: the plain tanh RNN (Elman 1990; Mikolov et al. 2010), the GRU (Cho et al. 2014)
or the LSTM (Hochreiter & Schmidhuber 1997).

Embedding -> dropout -> a stack of `n_layer` recurrent layers (`torch.nn.RNN` / `GRU` / `LSTM`, cuDNN
on GPU, dropout between layers) -> dropout -> [projection to d_model when tying needs it] -> decoder
to the vocabulary. Zaremba et al. 2014 ("Recurrent Neural Network Regularization") and the PyTorch
word_language_model example; weight tying as Press & Wolf 2017 / Inan et al. 2017. The cells:

    rnn   h_t = tanh(W_xh x_t + W_hh h_{t-1} + b)          (torch keeps b as two vectors, b_ih + b_hh)
    gru   r, z = sig(W_ir x + b_ir + W_hr h + b_hr), sig(W_iz x + b_iz + W_hz h + b_hz)
          n = tanh(W_in x + b_in + r * (W_hn h + b_hn));  h_t = (1 - z) * n + z * h_{t-1}
    lstm  i, f, g, o = W_ih x + b_ih + W_hh h + b_hh;  c_t = sig(f) c_{t-1} + sig(i) tanh(g)
          h_t = sig(o) tanh(c_t)

The recurrent module is registered under the cell's name (`rnn.*`, `gru.*`, `lstm.*` in the state
dict), so LSTM checkpoints written before the cell was a choice load unchanged (`cell` defaults to lstm).

It speaks the same interface as the GPT so that the CLM objective and `lmforge.generation.generate`
work unchanged: `model(input_ids)` -> logits (B, T, vocab); `encode(input_ids)` -> hidden states
(B, T, hidden_size) without the LM head (d_model wide when the embeddings are tied, as by default);
`new_cache(...)` gives a recurrent-state cache that `forward` updates in place, with `reorder(index)`
for beam search; padded positions (attention_mask == 0, e.g. a left-padded prompt) leave the state
unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lmforge.errors import ConfigError

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class LSTMConfig:
    """Shape of a recurrent language model.

    Args:
        vocab_size: tokenizer vocabulary size.
        d_model: embedding size (and the decoder's input size when embeddings are tied).
        d_hidden: recurrent hidden (and LSTM cell) state size.
        n_layer: stacked recurrent layers.
        dropout: dropout on the embeddings, between recurrent layers and before the decoder.
        tie_embeddings: share the input embedding with the output decoder; when d_hidden != d_model a
            linear projection d_hidden -> d_model is added before the decoder.
        init_range: embeddings (and an untied decoder) start uniform in [-init_range, init_range].
        cell: the recurrent cell: 'rnn' (plain tanh RNN), 'gru' or 'lstm'.
    """

    vocab_size: int = 8000
    d_model: int = 256
    d_hidden: int = 512
    n_layer: int = 2
    dropout: float = 0.2
    tie_embeddings: bool = True
    init_range: float = 0.1
    cell: Literal["rnn", "gru", "lstm"] = "lstm"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_hidden", "n_layer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.init_range <= 0:
            raise ConfigError(f"model.init_range must be positive, got {self.init_range}")
        if self.cell not in CELLS:
            raise ConfigError(f"model.cell must be one of {', '.join(CELLS)}, got {self.cell!r}")


class LSTMCache:
    """The recurrent state after the tokens fed so far: h, and for an LSTM also c, each
    (n_layer, B, d_hidden) (`c` is None for rnn/gru). Unlike a KV cache it does not grow: `max_len`
    is not needed and only `length` is counted."""

    def __init__(self, n_layer: int, batch_size: int, d_hidden: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, cell_state: bool = True):
        self.h = torch.zeros(n_layer, batch_size, d_hidden, dtype=dtype, device=device)
        self.c = torch.zeros_like(self.h) if cell_state else None
        self.length = 0  # tokens fed so far (padding included)

    @property
    def batch_size(self) -> int:
        return self.h.size(1)

    @property
    def state(self) -> tuple[torch.Tensor, ...]:
        return (self.h,) if self.c is None else (self.h, self.c)

    @state.setter
    def state(self, value: tuple[torch.Tensor, ...]) -> None:
        self.h = value[0]
        if self.c is not None:
            self.c = value[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (beam search)."""
        self.state = tuple(s.index_select(1, index) for s in self.state)

    def reset(self) -> None:
        for s in self.state:
            s.zero_()
        self.length = 0


class LSTMLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size), with an RNN, GRU or LSTM stack."""

    max_seq_len = None  # no fixed context: the state carries everything seen so far

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = cfg = config
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # registered under the cell's name: `lstm.weight_ih_l0` as before the cell was a choice
        self.add_module(cfg.cell, CELLS[cfg.cell](cfg.d_model, cfg.d_hidden, num_layers=cfg.n_layer, batch_first=True,
                                                  dropout=cfg.dropout if cfg.n_layer > 1 else 0.0))
        d_out = cfg.d_model if cfg.tie_embeddings else cfg.d_hidden
        self.proj = nn.Linear(cfg.d_hidden, cfg.d_model) if d_out != cfg.d_hidden else None
        self.decoder = nn.Linear(d_out, cfg.vocab_size)
        nn.init.uniform_(self.embedding.weight, -cfg.init_range, cfg.init_range)
        nn.init.zeros_(self.decoder.bias)
        if cfg.tie_embeddings:
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -cfg.init_range, cfg.init_range)

    @property
    def recurrent(self) -> nn.RNNBase:
        """The recurrent stack (torch.nn.RNN, GRU or LSTM)."""
        return getattr(self, self.config.cell)

    @property
    def hidden_size(self) -> int:
        """Width of `encode`'s output: d_model when the embeddings are tied, else d_hidden."""
        return self.config.d_model if self.config.tie_embeddings else self.config.d_hidden

    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> LSTMCache:
        """An all-zero state for `batch_size` rows (`max_len` is accepted for the generation protocol)."""
        p = self.embedding.weight
        return LSTMCache(self.config.n_layer, batch_size, self.config.d_hidden, dtype=dtype or p.dtype,
                         device=device if device is not None else p.device, cell_state=self.config.cell == "lstm")

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, hidden_size) without the LM head: the top recurrent layer's states, through
        the projection to d_model when tied embeddings need one (the decoder's input, before its dropout).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 = real token, 0 = padding. Right padding changes nothing before
                it; across left (or inner) padding the state is carried unchanged.
            token_type_ids: ignored (accepted so that every backbone takes the same arguments).
        """
        out = self._hidden(input_ids, attention_mask, None)
        return out if self.proj is None else self.proj(out)

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
            position_ids: ignored (a recurrent model knows order from the recurrence); accepted for the protocol.
            attention_mask: (B, T) or (B, cached + T), 1 = real token, 0 = padding; the state is carried
                unchanged across padded positions (their logits are meaningless).
            cache: a `new_cache(...)`: the starting state, replaced by the final state in place.
            output_attentions: not supported (a recurrent model has no attention).
        """
        if output_attentions:
            raise ConfigError(f"the {self.config.cell.upper()} LM has no attention weights (use a bert or gpt model)")
        out = self.drop(self._hidden(input_ids, attention_mask, cache))
        if self.proj is not None:
            out = self.proj(out)
        return self.decoder(out)  # (B, T, vocab)

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: LSTMCache | None):
        """(B, T, d_hidden) top-layer states, starting from (and updating) `cache` when given."""
        B, T = input_ids.shape
        state = None
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} rows, input has {B}")
            state = cache.state
        step_mask = None
        if attention_mask is not None:
            step_mask = attention_mask[:, -T:].bool()  # (B, T): the new tokens' columns
            # all real, or right padding only (real tokens first): padding cannot change earlier outputs,
            # and no state is carried beyond this call
            prefix = bool((step_mask[:, 1:] <= step_mask[:, :-1]).all()) and cache is None
            if bool(step_mask.all()) or prefix:
                step_mask = None
        x = self.drop(self.embedding(input_ids))  # (B, T, d_model)
        if step_mask is None:
            out, state = self.recurrent(x, self._pack(state))  # (B, T, d_hidden); one cuDNN call
            state = self._unpack(state)
        else:
            out, state = self._masked(x, state, step_mask)
        if cache is not None:
            cache.state = state
            cache.length += T
        return out

    def _pack(self, state: tuple[torch.Tensor, ...] | None):
        """Our state tuple -> what torch's module takes: (h, c) for an LSTM, h otherwise."""
        if state is None:
            return None
        return state if self.config.cell == "lstm" else state[0]

    def _unpack(self, state) -> tuple[torch.Tensor, ...]:
        return tuple(state) if isinstance(state, tuple) else (state,)

    def _masked(self, x: torch.Tensor, state, step_mask: torch.Tensor):
        """One step at a time, keeping a row's state where its token is padding (prompt prefill only)."""
        B, T, _ = x.shape
        if state is None:
            zeros = x.new_zeros(self.config.n_layer, B, self.config.d_hidden)
            state = (zeros, zeros) if self.config.cell == "lstm" else (zeros,)
        outs = []
        for t in range(T):
            o, new = self.recurrent(x[:, t : t + 1], self._pack(state))
            keep = step_mask[:, t].view(1, B, 1)
            state = tuple(torch.where(keep, n, s) for n, s in zip(self._unpack(new), state))
            outs.append(o)
        return torch.cat(outs, dim=1), state

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, tied weights once (`non_embedding` is accepted for symmetry with GPT; a
        recurrent model has no position table to leave out)."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        c = self.config
        tie = "tied" if c.tie_embeddings else "untied"
        return (f"{c.cell.upper()} LM: {self.num_params() / 1e6:.2f}M parameters ({c.n_layer} layers, d_model {c.d_model}, "
                f"d_hidden {c.d_hidden}, {tie} embeddings)")
