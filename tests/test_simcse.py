"""SimCSE: the loss against a brute-force computation, pooling, batches, and a short real run."""
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.simcse import SentenceBatcher
from lmforge.errors import ConfigError, DataError
from lmforge.models.bert import Bert, BertConfig
from lmforge.text.tokenizer import build_char
from lmforge.train.protocols import ObjectiveContext
from lmforge.train.simcse import SimCSEObjective, build, info_nce, pool

PAD, UNK, CLS, SEP, MASK = range(5)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tokenizer(V=100):
    return SimpleNamespace(kind="wordpiece", vocab_size=V, pad_id=PAD, unk_id=UNK, cls_id=CLS, sep_id=SEP, mask_id=MASK,
                           special_ids={PAD, UNK, CLS, SEP, MASK})


def shards(sent_lens=(4, 7, 2, 9, 5, 12, 3, 6), docs=(0, 3, 8), sentences=True, seed=0):
    sents = np.concatenate([[0], np.cumsum(sent_lens)]).astype(np.int64)
    tokens = np.random.default_rng(seed).integers(5, 100, sents[-1])
    return SimpleNamespace(tokens=tokens, doc_offsets=sents[list(docs)], sent_offsets=sents if sentences else None)


def brute_force_loss(z1, z2, tau):
    """-log softmax of the diagonal, with every cosine similarity written out as a loop."""
    z1, z2 = z1.double().tolist(), z2.double().tolist()
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    cos = [[dot(a, b) / math.sqrt(dot(a, a) * dot(b, b)) for b in z2] for a in z1]
    return sum(-(cos[i][i] / tau) + math.log(sum(math.exp(c / tau) for c in cos[i])) for i in range(len(z1))) / len(z1)


def test_loss_equals_brute_force_similarity_matrix():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for tau in (0.05, 0.5, 1.0):
        loss, acc = info_nce(z1, z2, tau)
        assert loss.item() == pytest.approx(brute_force_loss(z1, z2, tau), rel=1e-5)
    z2 = z1 + 0.01 * torch.randn(6, 5, generator=g)
    assert info_nce(z1, z2, 0.05)[1].item() == 1.0


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_objective_pairs_the_two_views(pooling):
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=100, max_position=16, n_layer=1, n_head=2, d_model=16, d_ff=32)).eval()
    ids = torch.randint(5, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    ids2, mask2 = ids.clone(), mask.clone()
    ids2[:, 3] = 7
    batch = {"input_ids": ids, "attention_mask": mask, "pair_input_ids": ids2, "pair_attention_mask": mask2}
    loss, metrics = SimCSEObjective(0.5, pooling).loss(model, batch)
    with torch.no_grad():  # each view encoded on its own
        z1 = pool(model(ids, attention_mask=mask).last_hidden_state, mask, pooling)
        z2 = pool(model(ids2, attention_mask=mask2).last_hidden_state, mask2, pooling)
    assert loss.item() == pytest.approx(brute_force_loss(z1, z2, 0.5), rel=1e-5)
    assert set(metrics) == {"acc", "alignment", "uniformity"} and all(v.dim() == 0 for v in metrics.values())
    # Without a second view, in train mode, the same batch encoded twice differs only by dropout.
    model.train()
    loss, metrics = SimCSEObjective().loss(model, {"input_ids": ids, "attention_mask": mask})
    assert loss.requires_grad and metrics["alignment"] > 0


def test_mean_pooling_ignores_padding():
    h = torch.randn(1, 3, 4)
    padded = torch.cat([h, torch.randn(1, 2, 4)], 1)
    torch.testing.assert_close(pool(padded, torch.tensor([[1, 1, 1, 0, 0]]), "mean"), h.mean(1))
    torch.testing.assert_close(pool(padded, torch.tensor([[1, 1, 1, 0, 0]]), "cls"), h[:, 0])


def test_sentence_batches():
    train = shards()
    b = SentenceBatcher(tokenizer(), train, shards(seed=1), seq_len=8, batch_size=4, seed=0, min_tokens=3)
    starts, lengths = b.train_spans
    assert list(lengths) == [4, 6, 6, 5, 6, 3, 6]  # sentences of >= 3 tokens, cut to seq_len - 2
    batch = b.train_batch(0, 0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] == mask.sum(1).max() <= 8  # padded to the longest row
    for r in range(4):
        row = ids[r, : mask[r].sum()].numpy()
        assert row[0] == CLS and row[-1] == SEP
        hits = [i for i, s in enumerate(starts) if list(train.tokens[s : s + len(row) - 2]) == list(row[1:-1])]
        assert hits  # a real sentence (prefix)
    assert torch.equal(ids, b.train_batch(0, 0)["input_ids"])
    vals = list(b.val_batches())
    assert len(vals) == 1 and torch.equal(vals[0]["pair_input_ids"], list(b.val_batches())[0]["pair_input_ids"])
    v = vals[0]
    for r in range(4):  # the second view is the sentence with some tokens deleted
        full = v["input_ids"][r, : v["attention_mask"][r].sum()].tolist()
        part = v["pair_input_ids"][r, : v["pair_attention_mask"][r].sum()].tolist()
        it = iter(full)
        assert all(t in it for t in part) and 3 <= len(part) <= len(full)
    # Without sentence offsets: windows of seq_len - 2 inside each document.
    w = SentenceBatcher(tokenizer(), shards(sentences=False), None, seq_len=8, batch_size=4, seed=0, min_tokens=1)
    assert list(w.train_spans[0]) == [0, 6, 12, 13, 19, 25, 31, 37, 43]  # documents [0, 13) and [13, 48)
    assert list(w.train_spans[1]) == [6, 6, 1, 6, 6, 6, 6, 6, 5]
    assert list(w.val_batches()) == []


def test_errors():
    ctx = lambda tok=tokenizer(), data=shards(), batch_size=4, **o: ObjectiveContext(
        tokenizer=tok, train=data, val=None, seq_len=16, batch_size=batch_size, seed=0, options=o)
    with pytest.raises(ConfigError, match="temperature"):
        build(ctx(temperature=0))
    with pytest.raises(ConfigError, match="pooling"):
        build(ctx(pooling="max"))
    with pytest.raises(ConfigError, match="batch_size"):
        build(ctx(batch_size=1))
    with pytest.raises(ConfigError, match="has no cls, sep, pad"):
        build(ctx(tok=build_char("abc")))
    with pytest.raises(DataError, match="no sentence of at least 50 tokens"):
        build(ctx(min_tokens=50))
    from lmforge.models.gpt import GPT, GPTConfig

    batcher, objective = build(ctx())
    gpt = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ConfigError, match="--arch bert"):
        objective.loss(gpt, batcher.train_batch(0, 0))


def test_short_run_brings_positives_closer_than_random_pairs(tmp_path):
    """A tiny BERT, 200 SimCSE steps on real review sentences: the two dropout views of a held-out sentence
    end up far closer than two different sentences (at initialisation everything is nearly parallel)."""
    from lmforge.data.prepare import prepare
    from lmforge.data.shards import open_prepared
    from lmforge.text.tokenizer import train_tokenizer
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    path = DATA / "imdb_unsup" / "imdb_unsup_even.txt"
    if not path.is_file():
        pytest.skip("imdb_unsup not available")
    with open(path, encoding="utf-8") as f:
        text = f.read(150_000).rsplit("\n\n", 1)[0]
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    train_tokenizer(text.split("\n\n"), kind="wordpiece", vocab_size=1000).save(tmp_path / "tok.json")
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "data"), str(tmp_path / "tok.json"), sentences=True, val_fraction=0.2)
    train, val, tok = open_prepared(tmp_path / "data")
    batcher, objective = build(ObjectiveContext(tokenizer=tok, train=train, val=val, seq_len=24, batch_size=16,
                                                seed=0, options={"pooling": "mean"}))
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=tok.vocab_size, max_position=24, n_layer=1, n_head=2, d_model=32, d_ff=64))
    held_out = next(iter(batcher.val_batches()))

    def cosines():
        model.train()  # dropout on: two different views of each sentence
        with torch.no_grad():
            ids, mask = held_out["input_ids"], held_out["attention_mask"]
            z1, z2 = (F.normalize(pool(model(ids, attention_mask=mask).last_hidden_state, mask, "mean"), dim=-1)
                      for _ in range(2))
        sim = z1 @ z2.T
        return sim.diag().mean().item(), sim[~torch.eye(len(sim), dtype=torch.bool)].mean().item()

    pos0, rand0 = cosines()
    cfg = TrainConfig(max_steps=200, lr=1e-3, warmup_steps=20, eval_every=0, eval_batches=4, log_every=50,
                      tensorboard=False, progress=False, device="cpu")
    trainer = Trainer(model, objective, batcher, cfg, tmp_path / "run", run_config={})
    before = trainer.evaluate()
    after = trainer.fit().val
    pos, rand = cosines()
    assert rand0 > 0.8  # a random encoder maps every sentence to nearly the same direction
    assert pos > rand + 0.5 and rand < rand0 - 0.5
    assert after["loss"] < before["loss"] and after["uniformity"] < before["uniformity"]
