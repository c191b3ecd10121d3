"""The Kneser-Ney n-gram LM against a brute-force computation of the smoothed probabilities (plain Python
dictionaries, straight from the definitions) and a hand-worked case; its distributions sum to 1 for every
context; scoring, caching, generation, checkpoints and the CLI paths, with the clear errors."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.models import arch_of, build_model
from lmforge.models.ngram import NGramConfig, NGramLM


# ---- the reference: Chen & Goodman's interpolated (modified) Kneser-Ney, written out -------------------------
def brute_force(tokens: list[int], V: int, N: int, smoothing: str):
    """p(w | h) for any context h (a tuple of at most N-1 tokens), by the definitions."""
    raw = {k: Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, N + 1)}
    counts = {N: raw[N]}
    for k in range(N - 1, 0, -1):  # continuation counts: distinct tokens seen before each k-gram
        counts[k] = Counter(g[1:] for g in raw[k + 1])
    disc = {}
    for k in range(1, N + 1):
        n = [sum(1 for c in counts[k].values() if c == j) for j in (1, 2, 3, 4)]
        y = n[0] / (n[0] + 2 * n[1]) if n[0] else 0.5
        d = [y, y, y]
        if smoothing == "modified_kn":
            for j in (1, 2, 3):
                if n[j - 1] and 0 < j - (j + 1) * y * n[j] / n[j - 1] <= j:
                    d[j - 1] = j - (j + 1) * y * n[j] / n[j - 1]
        disc[k] = d

    def p(w: int, h: tuple) -> float:
        k = len(h) + 1
        lower = 1.0 / V if k == 1 else p(w, h[1:])
        follow = {v: counts[k].get(h + (v,), 0) for v in range(V)}
        total = sum(follow.values())
        if total == 0:
            return lower
        D = disc[k]
        dis = lambda c: D[min(c, 3) - 1]  # noqa: E731
        gamma = sum(dis(c) for c in follow.values() if c > 0) / total
        c = follow[w]
        return (max(c - dis(c), 0.0) if c else 0.0) / total + gamma * lower

    return p


def model_dist(model: NGramLM, h: tuple) -> torch.Tensor:
    """The model's next-token distribution after context h (len >= 1), from the last position."""
    return model(torch.tensor([list(h)]))[0, -1].double().exp()


CORPUS = [0, 1, 2, 0, 1, 0, 3, 1, 2, 2, 0, 1, 3, 3, 0, 2, 1, 0, 1, 2, 0, 0, 1, 3, 2, 1, 0, 1, 2, 3]


@pytest.mark.parametrize("smoothing", ["modified_kn", "kn"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_equals_brute_force_for_every_context(order, smoothing):
    V = 5  # token 4 never occurs: it lives on the interpolation with the uniform distribution
    model = NGramLM.count(np.array(CORPUS), NGramConfig(vocab_size=V, order=order, smoothing=smoothing))
    ref = brute_force(CORPUS, V, order, smoothing)
    for length in range(1, order + 1):  # up to one token more than the model's context
        for h in itertools.product(range(V), repeat=length):
            got = model_dist(model, h)
            ctx = h[max(0, len(h) - (order - 1)):] if order > 1 else ()
            want = torch.tensor([ref(w, ctx) for w in range(V)], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
            assert abs(float(got.sum()) - 1.0) < 1e-5 and bool((got > 0).all())


def test_hand_worked_bigram_case():
    """tokens a b a b c (0 1 0 1 2), V = 4, order 2, one discount per order:
    bigrams ab:2 ba:1 bc:1 -> n1=2, n2=1, D = 2/(2+2) = 0.5; unigram continuation counts a,b,c: 1 each ->
    n1=3, n2=0, D = 1: p_1 = uniform 0.25. p(b|a) = (2-0.5)/2 + (0.5*1/2)*0.25 = 0.8125, p(x|a) = 0.0625;
    p(a|b) = p(c|b) = 0.5/2 + (0.5*2/2)*0.25 = 0.375, p(b|b) = p(d|b) = 0.125; an unseen context: 0.25."""
    model = NGramLM.count(np.array([0, 1, 0, 1, 2]), NGramConfig(vocab_size=4, order=2, smoothing="kn"))
    torch.testing.assert_close(model_dist(model, (0,)), torch.tensor([0.0625, 0.8125, 0.0625, 0.0625], dtype=torch.float64))
    torch.testing.assert_close(model_dist(model, (1,)), torch.tensor([0.375, 0.125, 0.375, 0.125], dtype=torch.float64))
    torch.testing.assert_close(model_dist(model, (3,)), torch.full((4,), 0.25, dtype=torch.float64))
    assert model.discounts[1].tolist() == [0.5, 0.5, 0.5] and model.discounts[0].tolist() == [1.0, 1.0, 1.0]


def test_distributions_sum_to_one_on_a_larger_corpus():
    rng = np.random.default_rng(0)
    tokens = (rng.zipf(1.5, size=5000) % 40).astype(np.int64)
    model = NGramLM.count(tokens, NGramConfig(vocab_size=50, order=4))
    ids = torch.from_numpy(np.concatenate([tokens[:300], rng.integers(0, 50, size=100)])).view(4, 100)
    probs = model(ids).double().exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 100, dtype=torch.float64), atol=1e-5, rtol=0)
    assert bool((probs > 0).all())


def test_token_logprobs_and_the_clm_loss_equal_the_full_distribution():
    from lmforge.train.clm import CLMObjective

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 12, size=3000)
    model = NGramLM.count(tokens, NGramConfig(vocab_size=12, order=3))
    chunk = torch.from_numpy(tokens[:6 * 17]).view(6, 17)
    x, y = chunk[:, :-1], chunk[:, 1:]
    full = model(x).double().gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(model.token_logprobs(x, y), full, atol=1e-6, rtol=1e-6)
    loss, _ = CLMObjective().loss(model, {"input_ids": x, "labels": y})
    assert abs(loss.item() + full.mean().item()) < 1e-5
    with pytest.raises(ValueError, match="targets"):
        model.token_logprobs(x, y[:, :3])


def test_cache_padding_and_generation():
    from lmforge.generation import generate

    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 9, size=2000)
    model = NGramLM.count(tokens, NGramConfig(vocab_size=9, order=3))
    ids = torch.from_numpy(tokens[:20]).view(2, 10)
    full = model(ids)
    cache = model.new_cache(2)
    parts = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    assert cache.length == 10
    torch.testing.assert_close(model(ids, logits_to_keep=3), full[:, -3:])
    # left padding: the padded row equals the unpadded prompt
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[1:, :7]], 1)
    out = model(padded, attention_mask=torch.tensor([[0, 0, 0] + [1] * 7]))
    torch.testing.assert_close(out[0, 3:], model(ids[1:, :7])[0])
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate(model, prompts, max_new_tokens=8)
    assert greedy == generate(model, prompts, max_new_tokens=8, use_cache=False)
    assert greedy[1] == generate(model, [[4, 5]], max_new_tokens=8)[0]
    # greedy = the argmax of the distribution after the prompt's last N-1 tokens
    assert greedy[0][0] == int(model(torch.tensor([[1, 2, 3]]))[0, -1].argmax())
    sampled = generate(model, prompts, max_new_tokens=8, do_sample=True, seed=3)
    assert sampled == generate(model, prompts, max_new_tokens=8, do_sample=True, seed=3)
    assert [len(b) for b in generate(model, prompts, max_new_tokens=5, num_beams=3)] == [5, 5]


def test_checkpoint_round_trip(tmp_path):
    from lmforge.text.tokenizer import build_char
    from lmforge.train.checkpoint import load_pretrained, save_checkpoint

    tokens = np.array(CORPUS * 3)
    model = NGramLM.count(tokens, NGramConfig(vocab_size=5, order=3))
    from lmforge.config import to_dict

    save_checkpoint(tmp_path / "ck", model=model, config={"arch": "ngram", "model": to_dict(model.config)},
                    tokenizer=build_char("abcde"))
    loaded, _, cfg = load_pretrained(tmp_path / "ck")
    assert arch_of(loaded) == "ngram" and cfg["model"]["ngrams"] == model.config.ngrams
    ids = torch.tensor([[0, 1, 2, 3, 4, 0]])
    torch.testing.assert_close(loaded(ids), model(ids))
    assert loaded.num_params() == sum(model.config.ngrams) + sum(model.config.contexts)
    assert list(loaded.parameters()) == []


def test_config_errors():
    with pytest.raises(ConfigError, match="model.order must be at least 1"):
        NGramConfig(order=0)
    with pytest.raises(ConfigError, match="highest order for this vocabulary is 4"):
        NGramConfig(vocab_size=8000, order=5)
    with pytest.raises(ConfigError, match="did you mean 'order'"):
        build_model("ngram", {"ordr": 3})
    with pytest.raises(ConfigError, match="model.ngrams must list 2"):
        NGramConfig(order=2, ngrams=[1])
    with pytest.raises(ConfigError, match="token id 7 is >= model.vocab_size 5"):
        NGramLM.count(np.array([1, 7]), NGramConfig(vocab_size=5, order=2))
    empty = build_model("ngram", {"vocab_size": 6, "order": 2})  # no counts yet: uniform
    torch.testing.assert_close(empty(torch.tensor([[1, 2]])).exp(), torch.full((1, 2, 6), 1 / 6))
    with pytest.raises(ConfigError, match="no attention"):
        empty(torch.tensor([[1]]), output_attentions=True)
    assert not hasattr(empty, "encode")  # nothing to fine-tune: finetune refuses archs without encode()


# ---- pretrain --arch ngram, generate, and the clear errors of the CLI ---------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.text.tokenizer import build_char

    tmp = tmp_path_factory.mktemp("ngram")
    text = "\n\n".join(f"the cat sat on the mat {i % 5}. a dog ran after it {i % 3}." for i in range(80))
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    build_char(sorted(set(text))).save(tmp / "tok.json")
    prepare([str(tmp / "corpus.txt")], str(tmp / "prep"), str(tmp / "tok.json"), workers=1)
    return tmp


def test_pretrain_ngram_scores_pretrains_windows_and_generates(prepared, tmp_path, capsys):
    from lmforge.data.shards import open_prepared
    from lmforge.recipes.generate import generate
    from lmforge.recipes.pretrain import DataConfig, pretrain

    summary = pretrain(DataConfig(path=str(prepared / "prep"), seq_len=16), arch="ngram", model={"order": 4},
                       runs_dir=str(tmp_path), name="ng")
    train, val, tok = open_prepared(prepared / "prep")
    model = NGramLM.count(np.asarray(train.tokens), NGramConfig(vocab_size=tok.vocab_size, order=4))
    # the reference: the CLM objective over exactly the validation windows pretrain's batcher yields
    from lmforge.data.clm import CLMBatcher
    from lmforge.train.clm import CLMObjective

    batcher = CLMBatcher(train, val, seq_len=16, batch_size=5, seed=0)
    losses = [(CLMObjective().loss(model, b)[0].item(), len(b["input_ids"])) for b in batcher.val_batches()]
    want = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    assert abs(summary["val"]["loss"] - want) < 1e-5
    texts = generate(str(tmp_path / "ng"), prompt="the c", max_new_tokens=12, strategy="greedy")
    assert texts[0].startswith("the c") and len(texts[0]) > len("the c")
    assert "n-gram LM: order 4" in capsys.readouterr().out


def _one_line_exit_2(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cli_errors_are_one_line(prepared, tmp_path, capsys):
    data = str(prepared / "prep")
    assert main(["pretrain", "--data.path", data, "--arch", "ngram", "--model.order", "3", "--runs_dir",
                 str(tmp_path), "--name", "ng"]) == 0
    capsys.readouterr()
    run = str(tmp_path / "ng")
    line = _one_line_exit_2(["pretrain", "--data.path", data, "--arch", "ngram", "--model.order", "0",
                             "--runs_dir", str(tmp_path)], capsys)
    assert "model.order must be at least 1" in line
    line = _one_line_exit_2(["pretrain", "--data.path", data, "--init_from", run, "--runs_dir", str(tmp_path)], capsys)
    assert "n-gram model is a table of counts" in line
    (tmp_path / "task.tsv").write_text("text\tlabel\nthe cat\t1\nthe dog\t0\n", encoding="utf-8")
    line = _one_line_exit_2(["finetune", "classify", "--init_from", run, "--data.train", str(tmp_path / "task.tsv"),
                             "--data.dev", str(tmp_path / "task.tsv"), "--runs_dir", str(tmp_path)], capsys)
    assert "ngram cannot be fine-tuned" in line
    line = _one_line_exit_2(["export", run, "--format", "hf", str(tmp_path / "hf")], capsys)
    assert "ngram model has no transformers equivalent" in line
    line = _one_line_exit_2(["pretrain", "--data.path", data, "--arch", "ngram", "--objective", "mlm",
                             "--runs_dir", str(tmp_path)], capsys)
    assert "objective must be clm" in line
    line = _one_line_exit_2(["pretrain", "--data.path", data, "--arch", "ngram", "--runs_dir", str(tmp_path),
                             "--name", "ng"], capsys)
    assert "already holds checkpoints" in line
    line = _one_line_exit_2(["pretrain", "--data.path", data, "--arch", "ngram", "--resume", "latest",
                             "--runs_dir", str(tmp_path), "--name", "ng2"], capsys)
    assert "nothing to resume" in line
    line = _one_line_exit_2(["pretrain", "--data.path", data, "--arch", "ngram", "--objective_args.whole_word", "true",
                             "--runs_dir", str(tmp_path)], capsys)
    assert "an n-gram model takes none" in line
    line = _one_line_exit_2(["pretrain", "--arch", "ngram", "--runs_dir", str(tmp_path)], capsys)
    assert "data.path is required" in line
