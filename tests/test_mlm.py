"""Masked-LM batches and objective: proportions, what may be masked, whole words, determinism, loss."""
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config import from_dict
from lmforge.data.mlm import Masker, MLMBatcher, is_cjk_char
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.models.bert import Bert, BertConfig
from lmforge.text.tokenizer import build_char, train_tokenizer
from lmforge.train.mlm import MLMObjective, MLMOptions, build_mlm
from lmforge.train.protocols import ObjectiveContext

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PAD, UNK, CLS, SEP, MASK = range(5)


def corpus(rel: str, chars: int) -> str:
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} not available")
    with open(path, encoding="utf-8") as f:
        return f.read(chars)


@pytest.fixture(scope="module")
def en_text():
    return [d for d in corpus("imdb_unsup/imdb_unsup_even.txt", 300_000).split("\n\n") if d.strip()][:-1]


@pytest.fixture(scope="module")
def en_tok(en_text):
    return train_tokenizer(en_text, kind="wordpiece", vocab_size=2000)


@pytest.fixture(scope="module")
def zh_text():
    lines = [ln.strip() for ln in corpus("zh_classic_novels/hongloumeng.txt", 200_000).splitlines()]
    return [ln for ln in lines if ln]


@pytest.fixture(scope="module")
def zh_tok(zh_text):
    return train_tokenizer(zh_text, kind="wordpiece", vocab_size=3000)


def stub_tokenizer(vocab_size=200):
    """Just what the masker reads from a tokenizer: BERT's five specials and plain tokens after them."""
    return SimpleNamespace(kind="wordpiece", vocab_size=vocab_size, pad_id=PAD, unk_id=UNK, cls_id=CLS, sep_id=SEP,
                           mask_id=MASK, special_ids={PAD, UNK, CLS, SEP, MASK},
                           id_to_token=lambda i: ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"][i] if i < 5 else f"t{i}")


def rows_with_specials(rng, B=32, T=64, V=200):
    """[CLS] tokens [SEP] [PAD]...: random lengths, and a few [UNK]s and [SEP]s inside."""
    ids = rng.integers(5, V, (B, T))
    lengths = rng.integers(8, T + 1, B)
    ids[rng.random((B, T)) < 0.03] = UNK
    ids[rng.random((B, T)) < 0.03] = SEP
    ids[:, 0] = CLS
    ids[np.arange(B), lengths - 1] = SEP
    ids[np.arange(T)[None, :] >= lengths[:, None]] = PAD
    return ids, lengths


def bounds(n, p, z=5.0):
    """Binomial count bounds: mean +- z standard deviations."""
    sd = (n * p * (1 - p)) ** 0.5
    return n * p - z * sd, n * p + z * sd


def test_masking_proportions_over_many_draws():
    masker = Masker(stub_tokenizer(), mask_prob=0.15)
    rng = np.random.default_rng(0)
    chosen = candidates = expected = as_mask = as_random = kept = 0
    first_half = second_half = 0
    for _ in range(150):
        ids, _ = rows_with_specials(rng)
        out, labels = masker(ids, rng)
        cand = ids >= 5
        sel = labels != -100
        assert not (sel & ~cand).any()  # specials, [UNK] and padding are never chosen
        assert (out[~sel] == ids[~sel]).all()  # nothing else changes
        assert (labels[sel] == ids[sel]).all()
        assert (sel.sum(1) == masker.budget(cand.sum(1))).all()
        candidates += cand.sum()
        chosen += sel.sum()
        expected += masker.budget(cand.sum(1)).sum()
        as_mask += (out[sel] == MASK).sum()
        as_random += ((out[sel] != MASK) & (out[sel] != ids[sel])).sum()
        kept += (out[sel] == ids[sel]).sum()
        assert (out[sel & (out != MASK)] >= 5).all()  # random replacements are never special tokens
        half = ids.shape[1] // 2
        first_half += (sel[:, :half].sum() / max(1, cand[:, :half].sum()))
        second_half += (sel[:, half:].sum() / max(1, cand[:, half:].sum()))
    # 15% of candidates (up to per-sequence rounding), chosen uniformly across positions
    assert abs(chosen / candidates - 0.15) < 0.005
    assert abs(first_half - second_half) / 150 < 0.01
    # of the chosen: 80% [MASK], 10% random (a random token equals the original with chance 1/195), 10% kept
    lo, hi = bounds(chosen, 0.8)
    assert lo < as_mask < hi
    p_random = 0.1 * (1 - 1 / 195)
    lo, hi = bounds(chosen, p_random)
    assert lo < as_random < hi
    lo, hi = bounds(chosen, 1 - 0.8 - p_random)
    assert lo < kept < hi


def test_configurable_probabilities():
    masker = Masker(stub_tokenizer(), mask_prob=0.4, mask_token_prob=1.0, random_token_prob=0.0, max_predictions=10)
    rng = np.random.default_rng(1)
    ids, _ = rows_with_specials(rng)
    out, labels = masker(ids, rng)
    sel = labels != -100
    assert (out[sel] == MASK).all()
    assert sel.sum(1).max() == 10


def test_whole_word_english_never_splits_a_word(en_tok, en_text):
    masker = Masker(en_tok, whole_word=True)
    rng = np.random.default_rng(2)
    checked_multi = chosen = cand = 0
    texts = en_text[:64]
    for _ in range(10):
        encs = [en_tok.backend.encode(t, add_special_tokens=False) for t in texts]
        rows = [np.array([CLS] + e.ids[:100] + [SEP]) for e in encs]
        T = max(map(len, rows))
        ids = np.stack([np.pad(r, (0, T - len(r))) for r in rows])
        _, labels = masker(ids, rng)
        for r, e in enumerate(encs):
            sel = labels[r, 1 : 1 + min(100, len(e.ids))] != -100
            # The independent segmentation: the pre-tokenizer's words (tokenizers' word_ids); the last
            # word of a truncated row may be cut, so it is left out.
            word_of = np.array([-1 if w is None else w for w in e.word_ids[: len(sel)]])
            for w in np.unique(word_of[word_of >= 0])[:-1]:
                pieces = sel[word_of == w]
                assert pieces.all() or not pieces.any(), (texts[r], w)
                checked_multi += len(pieces) > 1 and pieces.all()
            chosen += sel.sum()
            cand += len(sel)
    assert checked_multi > 20  # multi-piece words were masked as units
    assert abs(chosen / cand - 0.15) < 0.02  # the budget is still ~15% of tokens


def test_whole_word_chinese_follows_jieba(zh_tok, zh_text):
    import jieba

    masker = Masker(zh_tok, whole_word=True)
    # Whole clauses of plain Chinese text (CJK characters and full-width punctuation), short enough to fit.
    clauses = [c for ln in zh_text for c in re.split(r"(?<=[。！？])", ln) if 8 <= len(c) <= 60]
    clauses = [c for c in clauses if all(is_cjk_char(ch) or not ch.isalnum() for ch in c) and " " not in c][:64]
    assert len(clauses) == 64
    rng = np.random.default_rng(3)
    multi = 0
    for _ in range(10):
        encs = [zh_tok.backend.encode(c, add_special_tokens=False) for c in clauses]
        rows = [np.array([CLS] + e.ids + [SEP]) for e in encs]
        T = max(map(len, rows))
        ids = np.stack([np.pad(r, (0, T - len(r))) for r in rows])
        _, labels = masker(ids, rng)
        for r, (c, e) in enumerate(zip(clauses, encs)):
            sel = labels[r, 1 : 1 + len(e.ids)] != -100
            starts = np.array([s for s, _ in e.offsets])
            # Independent segmentation: jieba over the whole original clause, with its own character offsets.
            for word, a, b in jieba.tokenize(c):
                pieces = sel[(starts >= a) & (starts < b)]
                assert pieces.all() or not pieces.any(), (c, word)
                multi += len(pieces) > 1 and pieces.all()
    assert multi > 20


def synthetic_shards(doc_lengths, V=200, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, V, sum(doc_lengths)).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return SimpleNamespace(tokens=tokens, doc_offsets=offsets, sent_offsets=None, n_docs=len(doc_lengths), vocab_size=V)


def test_batcher_windows_pack_documents_and_are_deterministic():
    train = synthetic_shards([30, 5, 50, 12, 70, 40])
    val = synthetic_shards([25, 40, 9], seed=1)
    b = MLMBatcher(Masker(stub_tokenizer()), train, val, seq_len=32, batch_size=8, seed=7)
    # A window: [CLS] tokens [SEP], with [SEP] where a document ends inside it.
    w = b.window(train, 25)
    assert len(w) == 32 and w[0] == CLS and w[-1] == SEP
    assert list(w[1:6]) == list(train.tokens[25:30]) and w[6] == SEP
    assert list(w[7:12]) == list(train.tokens[30:35]) and w[12] == SEP
    assert list(w[13:31]) == list(train.tokens[35:53])
    one = b.train_batch(3, 0)
    assert set(one) == {"input_ids", "attention_mask", "token_type_ids", "labels", "mlm_positions"}
    again = b.train_batch(3, 0)
    for k in one:
        assert torch.equal(one[k], again[k])
    assert not torch.equal(one["labels"], b.train_batch(4, 0)["labels"])  # dynamic masking
    assert not torch.equal(one["labels"], b.train_batch(3, 1)["labels"])
    flat = one["labels"].flatten()
    assert torch.equal(one["mlm_positions"], (flat != -100).nonzero().squeeze(1))
    # Validation: the whole split once in consecutive windows; the same masks at every call.
    vals = list(b.val_batches())
    # windows [0, 30) [30, 60) [60, 74): 3 x [CLS]/[SEP], a [SEP] at the document ends 25 and 65 (the first
    # pushes token 29 out of its window)
    assert sum(v["attention_mask"].sum().item() for v in vals) == (74 - 1) + 2 * 3 + 2
    last = vals[-1]
    assert last["attention_mask"][-1].sum() < 32 and (last["input_ids"][-1][last["attention_mask"][-1] == 0] == PAD).all()
    again = list(b.val_batches())
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(vals, again))
    assert len(list(b.val_batches(limit=0))) == 0
    # Sharding over processes: each takes its slice of every global batch (batch_size x processes rows),
    # so two processes with 2 see the rows and masks of one process with 4.
    shards = [list(MLMBatcher(Masker(stub_tokenizer()), train, val, seq_len=32, batch_size=2, seed=7, rank=r,
                              world_size=2).val_batches()) for r in (0, 1)]
    single = list(MLMBatcher(Masker(stub_tokenizer()), train, val, seq_len=32, batch_size=4, seed=7).val_batches())
    assert [len(s) for s in shards] == [len(single)] * 2 == [1, 1]  # 3 windows: rows 0-1 and row 2
    for i, whole in enumerate(single):
        for k in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(torch.cat([s[i][k] for s in shards if i < len(s)]), whole[k])


def test_objective_equals_direct_cross_entropy():
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=200, max_position=32, n_layer=2, n_head=2, d_model=16, d_ff=32)).eval()
    b = MLMBatcher(Masker(stub_tokenizer()), synthetic_shards([100, 200]), None, seq_len=32, batch_size=4, seed=0)
    batch = b.train_batch(0, 0)
    loss, metrics = MLMObjective().loss(model, batch)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = model.mlm_logits(out.last_hidden_state)  # every position, then ignore the unchosen
    ref = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    sel = batch["labels"] != -100
    torch.testing.assert_close(metrics["mlm_acc"], (logits.argmax(-1)[sel] == batch["labels"][sel]).float().mean())
    assert metrics["mlm_acc"].dim() == 0 and MLMObjective.reports_perplexity


def test_build_and_a_few_training_steps(tmp_path):
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    def periodic(n):  # a learnable corpus: every token is predictable from its neighbours
        return SimpleNamespace(tokens=(5 + np.arange(n) * 7 % 30).astype(np.uint16),
                               doc_offsets=np.array([0, n // 2, n]), sent_offsets=None)

    ctx = ObjectiveContext(tokenizer=stub_tokenizer(), train=periodic(700), val=periodic(100), seq_len=24,
                           batch_size=8, seed=0, options={"mask_prob": 0.2})
    batcher, objective = build_mlm(ctx)
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=200, max_position=24, n_layer=1, n_head=2, d_model=32, d_ff=64, pre_ln=True))
    cfg = TrainConfig(max_steps=30, lr=3e-3, warmup_steps=0, eval_every=0, log_every=10, tensorboard=False,
                      progress=False, device="cpu", weight_decay=0.0)
    trainer = Trainer(model, objective, batcher, cfg, tmp_path, run_config={})
    before = trainer.evaluate()
    result = trainer.fit()
    assert {"loss", "mlm_acc", "ppl"} <= set(result.val)
    assert result.val["loss"] < 0.85 * before["loss"] and result.val["mlm_acc"] > before["mlm_acc"]


def test_errors_are_one_line_lmforge_errors():
    tok = stub_tokenizer()
    ctx = lambda **o: ObjectiveContext(tokenizer=tok, train=synthetic_shards([50]), val=None, seq_len=16,
                                       batch_size=2, seed=0, options=o)
    with pytest.raises(ConfigError, match="mask_prob"):
        build_mlm(ctx(mask_prob=1.5))
    with pytest.raises(ConfigError, match="did you mean 'whole_word'"):
        build_mlm(ctx(whole_words=True))
    with pytest.raises(ConfigError, match="mask_token_prob"):
        build_mlm(ctx(mask_token_prob=0.9, random_token_prob=0.2))
    with pytest.raises(ConfigError, match=r"no mask"):
        Masker(build_char("abc", ["[PAD]", "[CLS]", "[SEP]"]))
    bpe = SimpleNamespace(**{**vars(tok), "kind": "bpe"})
    with pytest.raises(ConfigError, match="whole_word needs a WordPiece"):
        build_mlm(SimpleNamespace(**{**vars(ctx()), "tokenizer": bpe, "options": {"whole_word": True}}))
    with pytest.raises(DataError, match="no tokens"):
        MLMBatcher(Masker(tok), synthetic_shards([0]), None, seq_len=16, batch_size=2, seed=0)
    from lmforge.models.gpt import GPT, GPTConfig

    batcher, objective = build_mlm(ctx())
    gpt = GPT(GPTConfig(vocab_size=200, block_size=16, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ConfigError, match="--arch bert"):
        objective.loss(gpt, batcher.train_batch(0, 0))
    for err in (ConfigError, DataError):
        assert issubclass(err, LmforgeError)
    assert from_dict(MLMOptions, {"whole_word": "true"}).whole_word is True
