"""Masked-LM and next-sentence-prediction batches from prepared token shards.

Masking (BERT, Devlin et al. 2019; Google's `create_pretraining_data.py`):
  * candidates are all tokens except special ones ([CLS] [SEP] [PAD] [MASK] [UNK], ...); per sequence
    `max(1, round(mask_prob * n_candidates))` of them are chosen (capped by `max_predictions`);
  * each chosen token independently becomes [MASK] (80%), a random non-special token (10%) or stays
    (10%); labels hold the original id at chosen positions and -100 elsewhere;
  * whole-word masking chooses words instead of tokens, in random order, adding a word while it fits
    the token budget (as Google's script does), and masks all of a word's tokens together.
    Words are: a WordPiece token plus the `##` pieces that follow it; and, for Chinese, jieba words over
    each run of consecutive single-CJK-character tokens (a WordPiece tokenizer makes every CJK character
    its own token, so the run's text is the concatenation of its tokens and jieba's word lengths map
    back to tokens one to one; no decoding is needed). Mixed words such as "T恤" are not joined.
  * masks are drawn afresh for every batch (dynamic masking, RoBERTa) from a generator seeded by
    (seed, step, micro); validation masks are seeded by the batch index, the same at every eval.

Under several processes a batch is a global one (batch_size x world_size rows), built and masked whole
from those seeds on every process, and process `rank` keeps rows rank * batch_size ... (rank + 1) *
batch_size - 1: N processes with batch_size B see exactly the rows (and masks) one process with N * B
sees. (Each process thus builds the whole global batch; cheap next to the model, except whole-word
masking of very large global batches.)

MLM sequences: `[CLS] window [SEP]` where the window is `seq_len - 2` consecutive tokens of the split,
starting anywhere. Documents are packed: where a document ends inside a window a [SEP] is inserted (and
the window cut back to length), as RoBERTa's FULL-SENTENCES packing. Validation covers the split once in
consecutive windows; the last one is shorter, padded with [PAD] and masked out by `attention_mask`.

NSP pairs (needs data prepared with `--sentences true`): sentence-level pairs as Google builds them:
segment A is one or more consecutive sentences of a document, B is the actual next sentence(s) (label
0) or, with probability 1/2, sentences from another random document (label 1, HF's
`next_sentence_label` convention); `[CLS] A [SEP] B [SEP]`, token_type_ids 0 for `[CLS] A [SEP]` and 1
for `B [SEP]`; with probability `short_seq_prob` a shorter target length is used; a pair too long is
cut one token at a time from the longer segment, from its front or back at random.

The rows are framed and padded here with numpy rather than by the tokenizer's post-processor and padding
(`Tokenizer.encode_for_model`, which text inputs use): the batchers read token ids from the shards, not
text, and the `tokenizers` library frames and pads only the encodings it makes from text itself (ids
turned back into token strings would be tokenized again, wrongly for `##` pieces). The ids of [CLS]
[SEP] [PAD] [MASK] are the tokenizer's own (`bert_specials`).
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from lmforge.data.clm import data_id
from lmforge.errors import ConfigError, DataError

_VAL = 0x5EED  # in validation seeds, keeps them apart from any (seed, step, micro, rank) of training


def is_cjk_char(ch: str) -> bool:
    """A CJK ideograph (the ranges Google's BERT tokenizer isolates as single-character words)."""
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _jieba():
    """jieba, initialised once and quietly (it logs its dictionary loading otherwise)."""
    import jieba

    if not jieba.dt.initialized:
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
    return jieba


def bert_specials(tokenizer) -> dict[str, int]:
    """The ids of [PAD] [CLS] [SEP] [MASK]; a clear error when the tokenizer lacks them."""
    ids = {name: getattr(tokenizer, f"{name}_id") for name in ("pad", "cls", "sep", "mask")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"masked-LM training needs a tokenizer with [PAD] [CLS] [SEP] [MASK] tokens; this "
                          f"{tokenizer.kind} tokenizer has no {', '.join(missing)} (train one with "
                          f"`lmforge tokenizer --kind wordpiece`)")
    return ids


class Masker:
    """Chooses MLM positions and corrupts them (see the module docstring).

    Args:
        tokenizer: a `lmforge.text.tokenizer.Tokenizer` with [PAD] [CLS] [SEP] [MASK].
        mask_prob: share of candidate tokens to predict.
        whole_word: choose whole words (needs a WordPiece tokenizer).
        mask_token_prob: share of chosen tokens replaced by [MASK].
        random_token_prob: share of chosen tokens replaced by a random non-special token.
        max_predictions: at most this many chosen tokens per sequence (None: no cap).
    """

    def __init__(self, tokenizer, *, mask_prob: float = 0.15, whole_word: bool = False, mask_token_prob: float = 0.8,
                 random_token_prob: float = 0.1, max_predictions: int | None = None):
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"objective_args.mask_prob must be in (0, 1), got {mask_prob}")
        if mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
            raise ConfigError("objective_args.mask_token_prob and random_token_prob must be >= 0 and sum to at most 1 "
                              f"(got {mask_token_prob} and {random_token_prob})")
        if max_predictions is not None and max_predictions < 1:
            raise ConfigError(f"objective_args.max_predictions must be at least 1, got {max_predictions}")
        if whole_word and tokenizer.kind != "wordpiece":
            raise ConfigError(f"objective_args.whole_word needs a WordPiece tokenizer (words are found from '##' pieces "
                              f"and CJK characters); this one is {tokenizer.kind}")
        self.ids = bert_specials(tokenizer)
        self.mask_prob, self.whole_word, self.max_predictions = mask_prob, whole_word, max_predictions
        self.mask_token_prob, self.random_token_prob = mask_token_prob, random_token_prob
        V = tokenizer.vocab_size
        self.special = np.zeros(V, dtype=bool)  # never chosen
        self.special[[i for i in tokenizer.special_ids | set(self.ids.values()) if i < V]] = True
        if tokenizer.unk_id is not None:
            self.special[tokenizer.unk_id] = True
        self.pool = np.flatnonzero(~self.special)  # random replacements come from here
        if len(self.pool) == 0:
            raise ConfigError("the tokenizer has no non-special tokens to mask")
        if whole_word:
            tokens = [tokenizer.id_to_token(i) or "" for i in range(V)]
            self.cont = np.array([t.startswith("##") for t in tokens])  # continues the previous token's word
            self.cjk = np.array([len(t) == 1 and is_cjk_char(t) for t in tokens])  # one CJK character
            self.chars = tokens

    # -- choosing ------------------------------------------------------------------------------------
    def word_ids(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) word index of each token (numbered per row), -1 for tokens never masked."""
        cand = ~self.special[ids]
        prev = np.zeros_like(cand)
        prev[:, 1:] = cand[:, :-1]
        start = cand & ~(self.cont[ids] & prev)  # a '##' piece joins the word before it
        cjk = self.cjk[ids] & cand
        for r in range(ids.shape[0]):
            self._segment_cjk(ids[r], cjk[r], start[r])
        words = np.cumsum(start, axis=1) - 1
        return np.where(cand, words, -1)

    def _segment_cjk(self, row: np.ndarray, cjk: np.ndarray, start: np.ndarray) -> None:
        """Within each run of >= 2 CJK-character tokens, only jieba word starts start a word."""
        if cjk.sum() < 2:
            return
        edges = np.diff(np.concatenate([[0], cjk.astype(np.int8), [0]]))
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            if b - a < 2:
                continue
            text = "".join(self.chars[i] for i in row[a:b])
            lengths = [len(w) for w in _jieba().lcut(text)]
            if sum(lengths) != b - a:  # never happens for plain characters; keep character words then
                continue
            start[a:b] = False
            start[a + np.cumsum([0] + lengths[:-1])] = True

    def budget(self, n_candidates: np.ndarray) -> np.ndarray:
        """Tokens to predict per sequence: max(1, round(mask_prob * n)), capped; 0 when n == 0."""
        k = np.maximum(1, np.floor(n_candidates * self.mask_prob + 0.5)).astype(np.int64)
        if self.max_predictions is not None:
            k = np.minimum(k, self.max_predictions)
        return np.where(n_candidates > 0, np.minimum(k, n_candidates), 0)

    def choose(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, T) bool: the positions to predict."""
        cand = ~self.special[ids]
        k = self.budget(cand.sum(1))
        if not self.whole_word:
            keys = np.where(cand, rng.random(ids.shape), 2.0)  # the k smallest random keys win
            ranks = keys.argsort(1, kind="stable").argsort(1, kind="stable")
            return ranks < k[:, None]
        words = self.word_ids(ids)
        chosen = np.zeros(ids.shape, dtype=bool)
        for r in range(ids.shape[0]):
            n_words = words[r].max() + 1
            if n_words <= 0:
                continue
            lengths = np.bincount(words[r][words[r] >= 0], minlength=n_words)
            picked, total = [], 0
            for w in rng.permutation(n_words):  # Google: skip a word that would overshoot the budget
                if total >= k[r]:
                    break
                if total + lengths[w] > k[r]:
                    continue
                picked.append(w)
                total += lengths[w]
            chosen[r] = np.isin(words[r], picked)
        return chosen

    # -- corrupting ----------------------------------------------------------------------------------
    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(corrupted input ids, labels with -100 where nothing is predicted), both (B, T) int64."""
        chosen = self.choose(ids, rng)
        labels = np.where(chosen, ids, -100).astype(np.int64)
        u = rng.random(ids.shape)
        to_mask = chosen & (u < self.mask_token_prob)
        to_random = chosen & (u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)
        out = ids.astype(np.int64, copy=True)
        out[to_mask] = self.ids["mask"]
        out[to_random] = rng.choice(self.pool, size=int(to_random.sum()))
        return out, labels

    def batch(self, ids: np.ndarray, lengths: np.ndarray, rng: np.random.Generator,
              token_type_ids: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Mask padded rows `ids` (B, T) whose first `lengths` tokens are real, as a training batch:
        input_ids, attention_mask, token_type_ids, labels (B, T) and mlm_positions (N,), the flat indices
        of the predicted positions (the model runs its MLM head only there)."""
        inputs, labels = self(ids, rng)
        attention = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        types = np.zeros_like(inputs) if token_type_ids is None else token_type_ids.astype(np.int64)
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.from_numpy(types),
            "labels": torch.from_numpy(labels),
            "mlm_positions": torch.from_numpy(np.flatnonzero(labels.reshape(-1) != -100)),
        }


def rows_of(batch: dict[str, torch.Tensor], rank: int, size: int) -> dict[str, torch.Tensor]:
    """Process `rank`'s rows (rank * size ... (rank + 1) * size - 1) of a global batch; `mlm_positions`
    (flat indices of the predicted positions) are recomputed for the slice."""
    rows = {k: v[rank * size : (rank + 1) * size] for k, v in batch.items() if k != "mlm_positions"}
    if "mlm_positions" in batch:
        rows["mlm_positions"] = torch.from_numpy(np.flatnonzero(rows["labels"].reshape(-1).numpy() != -100))
    return rows


def _pad(rows: list[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows stacked into (B, width) filled with `pad_id`, and their lengths."""
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out, np.array([len(r) for r in rows], dtype=np.int64)


class MLMBatcher:
    """Dynamic-masking MLM batches of `[CLS] window [SEP]` sequences (see the module docstring)."""

    def __init__(self, masker: Masker, train, val, *, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if seq_len < 3:
            raise ConfigError(f"data.seq_len must be at least 3 for [CLS] x [SEP], got {seq_len}")
        if len(train.tokens) == 0:
            raise DataError("the training split has no tokens")
        self.masker, self.train, self.val = masker, train, val
        self.seq_len, self.batch_size, self.seed, self.rank, self.world_size = seq_len, batch_size, seed, rank, world_size
        self.tokens_per_batch = batch_size * seq_len
        self.cls, self.sep, self.pad = masker.ids["cls"], masker.ids["sep"], masker.ids["pad"]
        self.data_id = data_id(train, val, seq_len=seq_len)  # recorded in checkpoints, checked on resume

    def _mine(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch if self.world_size == 1 else rows_of(batch, self.rank, self.batch_size)

    def window(self, shards, start: int) -> np.ndarray:
        """`[CLS]` + up to seq_len - 2 tokens from `start` with [SEP] between documents + `[SEP]`."""
        n = self.seq_len - 2
        toks = np.asarray(shards.tokens[start : start + n], dtype=np.int64)
        offs = shards.doc_offsets
        inside = offs[np.searchsorted(offs, start, "right") : np.searchsorted(offs, start + len(toks), "left")]
        inside = np.unique(inside)
        if len(inside):  # a document ends inside the window: separate it from the next by [SEP]
            inside = inside[toks[inside - start - 1] != self.sep]  # (unless the data already has one there)
            toks = np.insert(toks, inside - start, self.sep)[:n]
        return np.concatenate([[self.cls], toks, [self.sep]])

    def _batch(self, shards, starts: np.ndarray, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        ids, lengths = _pad([self.window(shards, int(s)) for s in starts], self.seq_len, self.pad)
        return self.masker.batch(ids, lengths, rng)

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This process's slice of the global micro-batch `micro` of `step`."""
        rng = np.random.default_rng([self.seed, step, micro, 0])  # the same global batch on every process
        n = len(self.train.tokens)
        starts = rng.integers(0, max(1, n - (self.seq_len - 2) + 1), size=self.batch_size * self.world_size)
        return self._mine(self._batch(self.train, starts, rng))

    def val_batches(self, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The validation split once, in consecutive windows, in global batches of batch_size x world_size
        windows (the first `limit` of them); global batch i is masked with seed (seed, i) and each process
        takes its slice, so the masks do not depend on the number of processes."""
        if self.val is None or len(self.val.tokens) == 0:
            return
        starts = np.arange(0, len(self.val.tokens), self.seq_len - 2)
        size = self.batch_size * self.world_size
        for i in range(-(-len(starts) // size)):
            if limit is not None and i >= limit:
                return
            if len(starts) <= i * size + self.rank * self.batch_size:  # a short last batch: nothing left for us
                continue
            rng = np.random.default_rng([self.seed, _VAL, i])
            yield self._mine(self._batch(self.val, starts[i * size : (i + 1) * size], rng))


class _Sentences:
    """Sentence and document tables of one split, for building NSP pairs."""

    def __init__(self, shards, name: str):
        if getattr(shards, "sent_offsets", None) is None:
            raise DataError(f"next-sentence prediction needs sentence boundaries, and the {name} split has none: "
                            f"prepare it with --sentences true")
        self.tokens = shards.tokens
        self.start = shards.sent_offsets[:-1]
        self.end = shards.sent_offsets[1:]
        docs = shards.doc_offsets
        self.doc = np.searchsorted(docs, self.start, "right") - 1  # the document of each sentence
        n_docs = len(docs) - 1
        self.first = np.searchsorted(self.doc, np.arange(n_docs), "left")  # first sentence of each doc
        self.last = np.searchsorted(self.doc, np.arange(n_docs), "right") - 1  # last (first > last: empty doc)
        self.docs_with_text = np.flatnonzero(self.first <= self.last)
        # A sentence that has a next sentence in its document can start an is-next pair.
        self.starts = np.flatnonzero(self.doc[:-1] == self.doc[1:]) if len(self.doc) > 1 else np.zeros(0, np.int64)
        if len(self.starts) == 0:
            raise DataError(f"next-sentence prediction: no document of the {name} split has two sentences")
        if len(self.docs_with_text) < 2:
            raise DataError(f"next-sentence prediction needs at least two documents in the {name} split "
                            f"(random next sentences come from another document)")

    def span(self, a: int, b: int) -> np.ndarray:
        """Tokens of sentences a .. b-1."""
        return np.asarray(self.tokens[self.start[a] : self.end[b - 1]], dtype=np.int64)

    def fill(self, s: int, target: int) -> int:
        """End (exclusive) of the sentences from `s` that reach `target` tokens or the document's end."""
        last = self.last[self.doc[s]]
        lens = self.end[s : last + 1] - self.start[s : last + 1]
        return s + min(int(np.searchsorted(np.cumsum(lens), target, "left")) + 1, len(lens))


class NSPBatcher:
    """MLM + next-sentence-prediction batches (see the module docstring); adds `nsp_labels` (B,)."""

    def __init__(self, masker: Masker, train, val, *, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, short_seq_prob: float = 0.1):
        if seq_len < 5:
            raise ConfigError(f"data.seq_len must be at least 5 for [CLS] A [SEP] B [SEP], got {seq_len}")
        if not 0.0 <= short_seq_prob <= 1.0:
            raise ConfigError(f"objective_args.short_seq_prob must be in [0, 1], got {short_seq_prob}")
        self.masker, self.seq_len, self.batch_size = masker, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.short_seq_prob = seed, rank, world_size, short_seq_prob
        self.train = _Sentences(train, "training")
        self.val = _Sentences(val, "validation") if val is not None and len(val.tokens) else None
        self.val_tokens = len(val.tokens) if self.val is not None else 0
        self.tokens_per_batch = batch_size * seq_len
        self.cls, self.sep, self.pad = masker.ids["cls"], masker.ids["sep"], masker.ids["pad"]
        self.structural = np.array(list(masker.ids.values()))
        self.data_id = data_id(train, val, seq_len=seq_len, short_seq_prob=short_seq_prob)

    def pair(self, S: _Sentences, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """(segment A, segment B, label): label 0 = B follows A in its document, 1 = B is from another."""
        max_tokens = self.seq_len - 3
        target = max_tokens if rng.random() >= self.short_seq_prob else int(rng.integers(2, max_tokens + 1))
        s = int(S.starts[rng.integers(len(S.starts))])
        e = max(S.fill(s, target), s + 1)
        a_end = s + (int(rng.integers(1, e - s)) if e - s >= 2 else 1)
        a = S.span(s, a_end)
        label = int(rng.random() < 0.5)
        if label == 0:  # the actual continuation: the rest of the chunk, or at least the next sentence
            b = S.span(a_end, max(e, a_end + 1))
        else:  # sentences from a random other document, from a random sentence on
            d = S.doc[s]
            others = S.docs_with_text[S.docs_with_text != d]
            d2 = int(others[rng.integers(len(others))])
            s2 = int(rng.integers(S.first[d2], S.last[d2] + 1))
            b = S.span(s2, S.fill(s2, max(1, target - len(a))))
        # Drop structural tokens from the text, e.g. the [SEP] that `prepare --append_eos` ends documents with.
        a, b = a[~np.isin(a, self.structural)], b[~np.isin(b, self.structural)]
        return *self.truncate(a, b, max_tokens, rng), label

    @staticmethod
    def truncate(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator):
        """Google's truncate_seq_pair: drop one token at a time from the longer segment (B on ties),
        from its front or its back at random, until the pair fits."""
        la, lb, cut = len(a), len(b), [0, 0, 0, 0]  # a front, a back, b front, b back
        coins = rng.random(max(0, la + lb - max_tokens))
        for coin in coins:
            side = 0 if la > lb else 2
            if side == 0:
                la -= 1
            else:
                lb -= 1
            cut[side + (coin >= 0.5)] += 1
        return a[cut[0] : len(a) - cut[1]], b[cut[2] : len(b) - cut[3]]

    def _batch(self, S: _Sentences, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A global batch (batch_size x world_size pairs) drawn from `rng`, and this process's slice of it."""
        rows, types, labels = [], [], []
        for _ in range(self.batch_size * self.world_size):
            a, b, label = self.pair(S, rng)
            rows.append(np.concatenate([[self.cls], a, [self.sep], b, [self.sep]]))
            types.append(np.concatenate([np.zeros(len(a) + 2, np.int64), np.ones(len(b) + 1, np.int64)]))
            labels.append(label)
        ids, lengths = _pad(rows, self.seq_len, self.pad)
        type_ids, _ = _pad(types, self.seq_len, 0)
        batch = self.masker.batch(ids, lengths, rng, type_ids)
        batch["nsp_labels"] = torch.tensor(labels, dtype=torch.long)
        return batch if self.world_size == 1 else rows_of(batch, self.rank, self.batch_size)

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This process's slice of the global micro-batch `micro` of `step` (drawn from (seed, step, micro))."""
        return self._batch(self.train, np.random.default_rng([self.seed, step, micro, 0]))

    def val_batches(self, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed pairs from the validation split: global batch i (batch_size x world_size pairs) is drawn
        with seed (seed, i), each process taking its slice; as many batches as it takes to cover the
        split's tokens about once (the first `limit`)."""
        if self.val is None:
            return
        n_batches = max(1, -(-self.val_tokens // (self.batch_size * self.world_size * (self.seq_len - 3))))
        for i in range(n_batches):
            if limit is not None and i >= limit:
                return
            yield self._batch(self.val, np.random.default_rng([self.seed, _VAL, i]))
