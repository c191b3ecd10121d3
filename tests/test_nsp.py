"""Next-sentence-prediction pairs: labels balanced, segments where they should be, segment ids, truncation,
and the joint MLM + NSP loss."""
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.mlm import Masker, NSPBatcher
from lmforge.errors import ConfigError, DataError
from lmforge.models.bert import Bert, BertConfig
from lmforge.train.mlm import MLMNSPObjective, build_mlm_nsp
from lmforge.train.protocols import ObjectiveContext

PAD, UNK, CLS, SEP, MASK = range(5)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tokenizer(V):
    return SimpleNamespace(kind="wordpiece", vocab_size=V, pad_id=PAD, unk_id=UNK, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                           special_ids={PAD, UNK, CLS, SEP, MASK}, id_to_token=lambda i: f"t{i}")


def corpus(n_docs=60, seed=0):
    """Token i of the split has id 5 + i, so every token tells where it came from."""
    rng = np.random.default_rng(seed)
    sent_lens = [rng.integers(2, 12, rng.integers(1, 7)) for _ in range(n_docs)]  # some docs have one sentence
    sents = np.concatenate([[0], np.cumsum(np.concatenate(sent_lens))])
    docs = np.concatenate([[0], np.cumsum([s.sum() for s in sent_lens])])
    n = int(docs[-1])
    shards = SimpleNamespace(tokens=np.arange(5, 5 + n, dtype=np.int64), doc_offsets=docs.astype(np.int64),
                             sent_offsets=sents.astype(np.int64), n_docs=n_docs)
    return shards, n + 5


def originals(batch):
    """Undo the masking: the original id where a label is set."""
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def split_pair(row, types, length):
    """(A positions, B positions) of one `[CLS] A [SEP] B [SEP]` row, checking the layout and segment ids."""
    seps = [i for i in range(length) if row[i] == SEP]
    assert row[0] == CLS and len(seps) == 2 and seps[1] == length - 1
    a, b = row[1 : seps[0]] - 5, row[seps[0] + 1 : seps[1]] - 5
    assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : length] == 1).all() and (types[length:] == 0).all()
    return a, b


def test_pairs_labels_segments_and_types():
    shards, V = corpus()
    b = NSPBatcher(Masker(tokenizer(V)), shards, None, seq_len=64, batch_size=32, seed=3)
    doc_of = np.searchsorted(shards.doc_offsets, np.arange(len(shards.tokens)), "right") - 1
    sent_starts, sent_ends = set(shards.sent_offsets[:-1]), set(shards.sent_offsets[1:])
    n_pairs = n_random = exact = 0
    for step in range(60):
        batch = b.train_batch(step, 0)
        ids, types, mask = originals(batch).numpy(), batch["token_type_ids"].numpy(), batch["attention_mask"].numpy()
        for r in range(ids.shape[0]):
            length = int(mask[r].sum())
            a, bb = split_pair(ids[r], types[r], length)
            assert len(a) and len(bb) and length <= 64
            assert (np.diff(a) == 1).all() and (np.diff(bb) == 1).all()  # contiguous text
            da, db = doc_of[a[0]], doc_of[bb[0]]
            assert doc_of[a[-1]] == da and doc_of[bb[-1]] == db  # each segment within one document
            label = int(batch["nsp_labels"][r])
            n_pairs += 1
            n_random += label
            if label == 1:
                assert db != da  # from another document
            else:
                assert db == da and bb[0] > a[-1]  # after A in the same document
                if length < 64:  # not truncated: B starts right where A ends, on sentence boundaries
                    assert bb[0] == a[-1] + 1 and a[0] in sent_starts and bb[0] in sent_starts
                    assert bb[-1] + 1 in sent_ends
                    exact += 1
    lo, hi = n_pairs * 0.5 - 5 * (n_pairs * 0.25) ** 0.5, n_pairs * 0.5 + 5 * (n_pairs * 0.25) ** 0.5
    assert lo < n_random < hi
    assert exact > 300


def test_truncation_fits_and_keeps_both_segments():
    shards, V = corpus(seed=1)
    b = NSPBatcher(Masker(tokenizer(V)), shards, shards, seq_len=12, batch_size=64, seed=0, short_seq_prob=0.0)
    batch = b.train_batch(0, 0)
    ids, types, mask = originals(batch).numpy(), batch["token_type_ids"].numpy(), batch["attention_mask"].numpy()
    assert (mask.sum(1) == 12).mean() > 0.9  # most pairs were longer and got cut to exactly seq_len
    for r in range(64):
        a, bb = split_pair(ids[r], types[r], int(mask[r].sum()))
        assert len(a) >= 1 and len(bb) >= 1
    # Google's rule on its own: the longer side loses tokens first, from either end.
    rng = np.random.default_rng(0)
    a, bb = NSPBatcher.truncate(np.arange(20), np.arange(100, 105), 10, rng)
    assert len(a) == 5 and len(bb) == 5 and (np.diff(a) == 1).all() and list(bb) == list(range(100, 105))
    a, bb = NSPBatcher.truncate(np.arange(3), np.arange(4), 10, rng)
    assert len(a) == 3 and len(bb) == 4


def test_deterministic_and_fixed_validation():
    shards, V = corpus()
    b = NSPBatcher(Masker(tokenizer(V)), shards, shards, seq_len=32, batch_size=8, seed=0)
    for k, v in b.train_batch(5, 1).items():
        assert torch.equal(v, b.train_batch(5, 1)[k])
    assert not torch.equal(b.train_batch(5, 1)["input_ids"], b.train_batch(6, 1)["input_ids"])
    first, second = list(b.val_batches()), list(b.val_batches())
    assert len(first) == -(-len(shards.tokens) // (8 * 29))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["nsp_labels"], y["nsp_labels"])
               for x, y in zip(first, second))
    assert len(list(b.val_batches(limit=2))) == 2


def test_joint_loss_is_mlm_plus_nsp():
    shards, V = corpus()
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=V, max_position=32, n_layer=1, n_head=2, d_model=16, d_ff=32)).eval()
    batch = NSPBatcher(Masker(tokenizer(V)), shards, None, seq_len=32, batch_size=8, seed=0).train_batch(0, 0)
    loss, m = MLMNSPObjective().loss(model, batch)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], nsp=True)
        mlm = F.cross_entropy(model.mlm_logits(out.last_hidden_state).flatten(0, 1), batch["labels"].flatten())
        nsp_logits = model.nsp_logits(out.pooled)
        nsp = F.cross_entropy(nsp_logits, batch["nsp_labels"])
    torch.testing.assert_close(loss, mlm + nsp)
    torch.testing.assert_close(m["nsp_acc"], (nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean())
    assert set(m) == {"mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc"} and all(v.dim() == 0 for v in m.values())
    assert not MLMNSPObjective.reports_perplexity


def test_errors():
    shards, V = corpus()
    no_sents = SimpleNamespace(**{**vars(shards), "sent_offsets": None})
    ctx = lambda train, **o: ObjectiveContext(tokenizer=tokenizer(V), train=train, val=None, seq_len=32, batch_size=4,
                                              seed=0, options=o)
    with pytest.raises(DataError, match="prepare it with --sentences true"):
        build_mlm_nsp(ctx(no_sents))
    one_doc = SimpleNamespace(tokens=shards.tokens[:20], doc_offsets=np.array([0, 20]),
                              sent_offsets=np.array([0, 5, 20]), n_docs=1)
    with pytest.raises(DataError, match="at least two documents"):
        build_mlm_nsp(ctx(one_doc))
    single_sentences = SimpleNamespace(tokens=shards.tokens[:20], doc_offsets=np.array([0, 5, 20]),
                                       sent_offsets=np.array([0, 5, 20]), n_docs=2)
    with pytest.raises(DataError, match="two sentences"):
        build_mlm_nsp(ctx(single_sentences))
    with pytest.raises(ConfigError, match="short_seq_prob"):
        build_mlm_nsp(ctx(shards, short_seq_prob=2))
    with pytest.raises(ConfigError, match="unknown config key 'objective_args.nsp'"):
        build_mlm_nsp(ctx(shards, nsp=True))


def test_prepared_english_corpus(tmp_path):
    """Through the real pipeline: tokenizer, `prepare --sentences true`, the builder, one loss."""
    from lmforge.data.prepare import prepare
    from lmforge.data.shards import open_prepared
    from lmforge.text.tokenizer import train_tokenizer

    path = DATA / "imdb_unsup" / "imdb_unsup_even.txt"
    if not path.is_file():
        pytest.skip("imdb_unsup not available")
    with open(path, encoding="utf-8") as f:
        text = f.read(120_000).rsplit("\n\n", 1)[0]
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    tok = train_tokenizer(text.split("\n\n"), kind="wordpiece", vocab_size=1500)
    tok.save(tmp_path / "tok.json")
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "data"), str(tmp_path / "tok.json"), sentences=True,
            val_fraction=0.2)
    train, val, tok = open_prepared(tmp_path / "data")
    ctx = ObjectiveContext(tokenizer=tok, train=train, val=val, seq_len=64, batch_size=8, seed=0,
                           options={"whole_word": True})
    batcher, objective = build_mlm_nsp(ctx)
    batch = batcher.train_batch(0, 0)
    norm = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())
    corpus_text = norm(text)
    for r in range(8):  # both segments are pieces of the corpus text
        row = originals(batch)[r][batch["attention_mask"][r].bool()].tolist()
        sep = row.index(tok.sep_id)
        for seg in (row[1:sep], row[sep + 1 : -1]):
            assert seg and (tok.unk_id in seg or norm(tok.decode(seg)) in corpus_text)
    model = Bert(BertConfig(vocab_size=tok.vocab_size, max_position=64, n_layer=1, n_head=2, d_model=16, d_ff=32))
    loss, metrics = objective.loss(model, batch)
    assert torch.isfinite(loss) and 0 <= metrics["nsp_acc"] <= 1
    assert len(list(batcher.val_batches())) >= 1
