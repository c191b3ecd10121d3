"""Task heads on top of a backbone's hidden states (B, T, d_model). Pure torch.nn, no I/O.

- `pool`: a sentence vector from the hidden states ([CLS] state or mean over real tokens).
- `SequenceClassifier`: dropout -> Linear on the pooled vector (BERT's fine-tuning head, without its
  pretraining pooler).
- `TokenClassifier`: dropout -> Linear on every position: emissions (B, T, n_labels).
- `CRF`: a linear-chain conditional random field over emissions (Lafferty et al. 2001): the batched
  forward algorithm for log Z, the score of a tag path, the negative log-likelihood, and batched Viterbi
  decoding; optional allowed-transition constraints (`iob2_constraints`) keep decoded paths valid.
- `SpanHead`: start / end logits per position (extractive QA).

Linear layers start as BERT's do (normal, std 0.02; zero bias), so a head on a pretrained backbone
trains as in the BERT paper's fine-tuning recipes.
"""
from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError

NEG = -1e4  # score of a forbidden transition: exp(NEG) underflows to 0 in fp32, yet NEG + NEG stays finite


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, how: str = "cls") -> torch.Tensor:
    """(B, T, d) hidden states -> (B, d) sentence vectors.

    Args:
        hidden: the backbone's last hidden states.
        attention_mask: (B, T), 1 on real tokens (needed for "mean"; None = all real).
        how: "cls" (the state of the first token, [CLS]) or "mean" (the mean over real tokens).
    """
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise ConfigError(f"pooling: {how!r} is not one of 'cls', 'mean'")


def _bert_init(linear: nn.Linear) -> nn.Linear:
    nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)
    return linear


class SequenceClassifier(nn.Module):
    """Pooled sentence vector -> dropout -> Linear -> (B, n_labels) logits.

    Args:
        d_model: width of the hidden states.
        n_labels: number of classes.
        dropout: dropout on the pooled vector.
        pooling: "cls" (BERT-style) or "mean".
    """

    def __init__(self, d_model: int, n_labels: int, dropout: float = 0.1, pooling: str = "cls"):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"pooling: {pooling!r} is not one of 'cls', 'mean'")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = _bert_init(nn.Linear(d_model, n_labels))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(pool(hidden, attention_mask, self.pooling)))


class TokenClassifier(nn.Module):
    """Per-position dropout -> Linear: (B, T, d) -> (B, T, n_labels) emissions (logits, or CRF emissions)."""

    def __init__(self, d_model: int, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = _bert_init(nn.Linear(d_model, n_labels))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


class SpanHead(nn.Module):
    """Start and end logits per position, (B, T) each, from one Linear(d_model, 2)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.qa_outputs = _bert_init(nn.Linear(d_model, 2))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.qa_outputs(hidden).unbind(-1)  # (B, T) each
        return start, end


def iob2_constraints(labels: list[str]) -> torch.Tensor:
    """Allowed transitions of IOB2 tags, as a (L + 2, L + 2) bool matrix over the L labels plus START
    (index L) and END (index L + 1): allowed[i, j] says tag j may follow tag i. I-X may only follow B-X or
    I-X (never START, O, or another type); everything else is allowed."""
    n = len(labels)
    allowed = torch.ones(n + 2, n + 2, dtype=torch.bool)
    allowed[:, n] = False  # nothing goes back to START
    allowed[n + 1, :] = False  # nothing leaves END
    for j, tag in enumerate(labels):
        if tag.startswith("I-"):
            kind = tag[2:]
            for i in range(n + 2):
                prev = labels[i] if i < n else ""
                allowed[i, j] = prev in (f"B-{kind}", f"I-{kind}")
    return allowed


class CRF(nn.Module):
    """Linear-chain CRF. A tag path y over emissions e (B, T, L) scores

        s(y) = start[y_0] + sum_t e[t, y_t] + sum_{t>0} transitions[y_{t-1}, y_t] + end[y_last]

    and p(y | e) = exp(s(y)) / Z with Z the sum over all L^T paths (the forward algorithm computes log Z
    in O(T L^2)). Sequences are given by a (B, T) bool mask of prefixes (first position always on).
    All computation is in float32.

    Args:
        n_labels: L.
        constraints: optional allowed transitions: (L, L) between tags, or (L + 2, L + 2) with START at
            index L and END at L + 1 (`iob2_constraints`). Forbidden ones score NEG, so Viterbi never
            picks them while a valid path exists.
    """

    def __init__(self, n_labels: int, constraints: torch.Tensor | None = None):
        super().__init__()
        self.n_labels = n_labels
        # zeros: at the start the CRF decodes like the emissions' argmax (within the constraints)
        self.start = nn.Parameter(torch.zeros(n_labels))
        self.end = nn.Parameter(torch.zeros(n_labels))
        self.transitions = nn.Parameter(torch.zeros(n_labels, n_labels))  # [from, to]
        penalty = torch.zeros(n_labels + 2, n_labels + 2)
        if constraints is not None:
            c = torch.as_tensor(constraints, dtype=torch.bool)
            if c.shape == (n_labels, n_labels):
                full = torch.ones(n_labels + 2, n_labels + 2, dtype=torch.bool)
                full[:n_labels, :n_labels] = c
                c = full
            if c.shape != (n_labels + 2, n_labels + 2):
                raise ConfigError(f"CRF constraints: shape {tuple(c.shape)}, expected ({n_labels}, {n_labels}) "
                                  f"or ({n_labels + 2}, {n_labels + 2})")
            penalty = penalty.masked_fill(~c, NEG)
        # not parameters, not saved: rebuilt from the label names
        self.register_buffer("_penalty", penalty, persistent=False)

    def _scores(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start, transitions, end) with the constraint penalties added, float32."""
        n, p = self.n_labels, self._penalty
        return (self.start.float() + p[n, :n], self.transitions.float() + p[:n, :n],
                self.end.float() + p[:n, n + 1])

    @staticmethod
    def _mask(emissions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = emissions.shape
        if mask is None:
            return torch.ones(B, T, dtype=torch.bool, device=emissions.device)
        if mask.shape != (B, T):
            raise ValueError(f"CRF mask shape {tuple(mask.shape)} does not match emissions {tuple(emissions.shape)}")
        return mask.bool()

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log Z per sequence, (B,), by the forward algorithm (logsumexp over the previous tag)."""
        mask = self._mask(emissions, mask)
        em = emissions.float()
        start, trans, end = self._scores()
        alpha = start + em[:, 0]  # (B, L): log-sum of all paths ending in each tag
        for t in range(1, em.size(1)):
            # (B, L_prev, 1) + (L_prev, L_next) + (B, 1, L_next) -> logsumexp over L_prev
            nxt = torch.logsumexp(alpha.unsqueeze(2) + trans + em[:, t].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, t, None], nxt, alpha)  # padded steps keep the last real alpha
        return torch.logsumexp(alpha + end, dim=1)

    def score(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """s(y) of the given tag paths, (B,). Tags at padded positions are ignored (any value)."""
        mask = self._mask(emissions, mask)
        em = emissions.float()
        start, trans, end = self._scores()
        tags = tags.masked_fill(~mask, 0).long()
        on = mask.float()
        emit = em.gather(2, tags.unsqueeze(2)).squeeze(2)  # (B, T)
        s = start[tags[:, 0]] + (emit * on).sum(1)
        s = s + (trans[tags[:, :-1], tags[:, 1:]] * on[:, 1:]).sum(1)
        last = mask.long().sum(1) - 1  # index of each sequence's last real position
        return s + end[tags.gather(1, last.unsqueeze(1)).squeeze(1)]

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor | None = None,
            reduction: str = "mean") -> torch.Tensor:
        """-log p(tags | emissions) = log Z - s(tags); reduction "mean" / "sum" over the batch, "token_mean"
        (sum over sequences / number of real positions) or "none" ((B,))."""
        out = self.log_partition(emissions, mask) - self.score(emissions, tags, mask)
        if reduction == "none":
            return out
        if reduction == "sum":
            return out.sum()
        if reduction == "mean":
            return out.mean()
        if reduction == "token_mean":
            return out.sum() / self._mask(emissions, mask).sum().clamp(min=1)
        raise ConfigError(f"CRF reduction {reduction!r} is not one of 'mean', 'sum', 'token_mean', 'none'")

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor | None = None) -> list[list[int]]:
        """The best tag path of each sequence (batched Viterbi), as lists of each sequence's real length."""
        mask = self._mask(emissions, mask)
        em = emissions.float()
        start, trans, end = self._scores()
        B, T, L = em.shape
        best = start + em[:, 0]  # (B, L): best score of a path ending in each tag
        keep = torch.arange(L, device=em.device).expand(B, L)
        back = []  # back[t-1][b, j]: best previous tag for tag j at step t (identity on padded steps)
        for t in range(1, T):
            cand = best.unsqueeze(2) + trans + em[:, t].unsqueeze(1)  # (B, L_prev, L_next)
            val, arg = cand.max(dim=1)
            on = mask[:, t, None]
            best = torch.where(on, val, best)
            back.append(torch.where(on, arg, keep))
        tag = (best + end).argmax(dim=1)  # (B,) last tag; padded steps carry it back unchanged
        path = [tag]
        for arg in reversed(back):
            tag = arg.gather(1, tag.unsqueeze(1)).squeeze(1)
            path.append(tag)
        paths = torch.stack(path[::-1], dim=1).tolist()  # (B, T)
        lengths = mask.sum(1).tolist()
        return [p[:n] for p, n in zip(paths, lengths)]
