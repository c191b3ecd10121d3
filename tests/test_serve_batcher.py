"""Continuous batching (lmforge.serve.batcher) against the library's own `generate` as the reference:
rows joining and leaving a running batch between steps, through cache shifts and compaction, give
exactly the tokens each prompt gets alone; and the streamed text rules (stop strings, held-back text)."""
from __future__ import annotations

import random

import pytest
import torch

from lmforge.generation import generate
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.serve.batcher import DecodeBatch, Row, Sampling
from lmforge.text.tokenizer import train_tokenizer

from serve_helpers import TEXT


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, kind="bpe", vocab_size=300)


def _model(position: str, block_size: int = 64, seed: int = 0):
    """A tiny GPT (position 'learned' or 'rope'), or a recurrent LM (position 'lstm' / 'gru')."""
    torch.manual_seed(seed)
    if position in ("lstm", "gru"):
        from lmforge.models.lstm import LSTMConfig, LSTMLM

        return LSTMLM(LSTMConfig(vocab_size=320, d_model=32, d_hidden=48, n_layer=2, dropout=0.0, cell=position)).eval()
    return GPT(GPTConfig(vocab_size=320, block_size=block_size, n_layer=2, n_head=2, d_model=32,
                         position=position)).eval()


def _reference(model, tok, prompt: list[int], s: Sampling) -> list[int]:
    """What `generate` gives this prompt alone (eos dropped, as the server drops it)."""
    return generate(model, [prompt], max_new_tokens=s.max_tokens, do_sample=s.temperature > 0,
                    temperature=s.temperature or 1.0, top_k=s.top_k, top_p=s.top_p,
                    repetition_penalty=s.repetition_penalty, seed=s.seed, eos_token_id=tok.eos_id)[0]


def _run(batch: DecodeBatch, rows: list[Row], join_every: int, per_join: int, groups: bool = False) -> None:
    """Feed `rows` into the batch a few at a time between steps until all are finished."""
    waiting, step = list(rows), 0
    while waiting or batch.rows:
        if waiting and batch.free and step % join_every == 0:
            k = min(batch.free, per_join)
            new, waiting = waiting[:k], waiting[k:]
            if groups:  # rows sharing a prompt object are prefilled once
                grouped: list[list[Row]] = []
                for r in new:
                    if grouped and grouped[-1][0].prompt is r.prompt:
                        grouped[-1].append(r)
                    else:
                        grouped.append([r])
                batch.add(grouped)
            else:
                batch.add([[r] for r in new])
        batch.step()
        step += 1
        assert step < 10_000


@pytest.mark.parametrize("position", ["learned", "rope", "lstm", "gru"])
def test_joining_and_leaving_rows_match_generate_alone(tok, position):
    model = _model(position)
    texts = ["the quick", "hello", "a", "once upon a time there was", "the movie was good and the cat"]
    prompts = [tok.encode(t) for t in texts]
    rng = random.Random(0)
    jobs = []
    for i in range(12):
        s = Sampling(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 0.7, 1.0, 1.3]), seed=100 + i,
                     top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 5]),
                     repetition_penalty=rng.choice([1.0, 1.0, 1.3]))
        jobs.append((prompts[i % len(prompts)], s))
    batch = DecodeBatch(model, tok, max_rows=4, max_len=64)
    rows = [Row(p, s) for p, s in jobs]
    _run(batch, rows, join_every=3, per_join=2)
    for row, (p, s) in zip(rows, jobs):
        assert row.out == _reference(model, tok, p, s)
        assert row.finish_reason in ("stop", "length")
        assert row.text == tok.decode(row.out)
    assert batch.rows == [] and batch.length == 0


def test_cache_shifts_keep_rows_exact(tok):
    """A small cache forces left shifts (compaction) and right shifts (a longer prompt joining)."""
    model = _model("rope", seed=1)
    short, long = tok.encode("a"), tok.encode("once upon a time there was a king. the quick brown fox")
    jobs = [(short, Sampling(max_tokens=20, temperature=0.9, seed=1)),
            (long, Sampling(max_tokens=10, temperature=0.0)),
            (short, Sampling(max_tokens=18, temperature=1.1, seed=2)),
            (long, Sampling(max_tokens=12, temperature=0.8, seed=3))]
    max_len = len(long) + 14
    batch = DecodeBatch(model, tok, max_rows=2, max_len=max_len)
    rows = [Row(p, s) for p, s in jobs]
    seen_lengths = []
    orig_step = batch.step

    def step(drop=()):
        seen_lengths.append(batch.length)
        return orig_step(drop)

    batch.step = step
    _run(batch, rows, join_every=5, per_join=1)
    assert max(seen_lengths) <= max_len - 1
    for row, (p, s) in zip(rows, jobs):
        assert row.out == _reference(model, tok, p, s)


def test_choices_of_one_prompt_share_its_prefill(tok):
    model = _model("learned")
    prompt = tok.encode("the cat sat")
    samplings = [Sampling(max_tokens=15, temperature=1.0, seed=s) for s in (5, 6, 7)]
    rows = [Row(prompt, s) for s in samplings]  # one prompt object: one prefill, copied to three rows
    batch = DecodeBatch(model, tok, max_rows=3, max_len=64)
    _run(batch, rows, join_every=1, per_join=3, groups=True)
    for row, s in zip(rows, samplings):
        assert row.out == _reference(model, tok, prompt, s)
    assert len({tuple(r.out) for r in rows}) > 1  # different seeds, different samples


def test_dropped_rows_leave_the_others_untouched(tok):
    model = _model("learned")
    jobs = [(tok.encode(t), Sampling(max_tokens=25, temperature=1.0, seed=i))
            for i, t in enumerate(["the quick", "hello world", "once upon"])]
    rows = [Row(p, s) for p, s in jobs]
    batch = DecodeBatch(model, tok, max_rows=3, max_len=64)
    batch.add([[r] for r in rows])
    for _ in range(5):
        batch.step()
    batch.step(drop=[rows[1]])
    assert rows[1] not in batch.rows
    while batch.rows:
        batch.step()
    for i in (0, 2):
        assert rows[i].out == _reference(model, tok, *jobs[i])
    assert len(rows[1].out) < 25 and rows[1].finish_reason is None


def test_learned_positions_stop_at_the_context(tok):
    """A row ends with 'length' when the model's context is full, never overflowing it."""
    model = _model("learned", block_size=16)
    prompt = tok.encode("the quick brown fox")
    row = Row(prompt, Sampling(max_tokens=100, temperature=0.0))
    batch = DecodeBatch(model, tok, max_rows=1, max_len=16)
    batch.add([[row]])
    while batch.rows:
        batch.step()
    assert row.finish_reason == "length"
    assert len(prompt) + len(row.out) == 17  # the last token is sampled from a full context, never fed
    assert row.out[:-1] == generate(model, [prompt], max_new_tokens=16 - len(prompt))[0]


def test_logprobs_are_the_model_distribution(tok):
    model = _model("learned")
    prompt = tok.encode("hello")
    row = Row(prompt, Sampling(max_tokens=3, temperature=0.0, logprobs=2))
    batch = DecodeBatch(model, tok, max_rows=1, max_len=64)
    emitted = batch.add([[row]])
    lp = emitted[0].logprob
    with torch.no_grad():
        expected = model(torch.tensor([prompt]))[0, -1].float().log_softmax(-1)
    top = expected.topk(2)
    assert lp["token"] == tok.decode([int(top.indices[0])])  # greedy: the most likely token
    assert lp["logprob"] == pytest.approx(float(top.values[0]), abs=1e-5)
    assert list(lp["top"].values()) == pytest.approx(top.values.tolist(), abs=1e-5)
    assert lp["offset"] == 0


# ---- the text a row hands out ------------------------------------------------------------------------
class CharTok:
    """Decodes ids as characters (id -> chr(id)); 0xFFFD stands for an incomplete byte sequence."""
    eos_id = 0

    @staticmethod
    def decode(ids):
        return "".join(chr(i) for i in ids)


def _push(row: Row, text: str) -> list[tuple[str, str | None]]:
    return [row.push(ord(c), CharTok, CharTok.eos_id) for c in text]


def test_stop_string_is_cut_and_never_sent():
    row = Row([1], Sampling(max_tokens=50, stop=("END", "\n\n")))
    out = _push(row, "abcEN")
    assert "".join(t for t, _ in out) == "abc"  # "EN" may become "END": held back
    out = _push(row, "Xd")
    assert "".join(t for t, _ in out) == "ENXd"  # it did not
    text, finish = _push(row, "xyEND")[-1]
    assert finish == "stop" and row.text == "abcENXdxy" and row.sent == len(row.text)


def test_stop_string_across_many_tokens_and_eos_flush():
    row = Row([1], Sampling(max_tokens=50, stop=("\n\n",)))
    sent = "".join(t for t, _ in _push(row, "para one\n"))
    assert sent == "para one"
    text, finish = row.push(0, CharTok, CharTok.eos_id)  # eos: what was held back is flushed
    assert (text, finish) == ("\n", "stop")


def test_incomplete_character_is_held_back():
    row = Row([1], Sampling(max_tokens=50))
    assert row.push(ord("a"), CharTok, None) == ("a", None)
    assert row.push(0xFFFD, CharTok, None) == ("", None)  # maybe half of a character
    assert row.push(ord("b"), CharTok, None) == ("\ufffdb", None)


def test_max_tokens_finishes_with_length():
    row = Row([1], Sampling(max_tokens=3))
    out = _push(row, "abc")
    assert [f for _, f in out] == [None, None, "length"]
    assert "".join(t for t, _ in out) == "abc"


def test_ignore_eos_keeps_going():
    row = Row([1], Sampling(max_tokens=3, ignore_eos=True))
    assert row.push(0, CharTok, CharTok.eos_id) == ("\x00", None)
    assert Row([1], Sampling(max_tokens=3)).push(0, CharTok, CharTok.eos_id) == ("", "stop")
