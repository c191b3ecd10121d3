"""`lmforge evaluate` perplexity against a token-by-token reference, and `lmforge ablation` end to end."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main, run_verb
from lmforge.models import build_model
from lmforge.text.tokenizer import train_tokenizer
from lmforge.train.checkpoint import save_checkpoint
from lmforge.train.trainer import read_metrics

TEXT = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat and "
        "a bird sings in the old tree near the river bank as the sun goes down over the hills ") * 3


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    tok = train_tokenizer([TEXT], kind="bpe", vocab_size=280, min_frequency=1)
    values = {"vocab_size": tok.vocab_size, "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16}
    torch.manual_seed(0)
    model = build_model("gpt", values)
    save_checkpoint(d / "ckpt", model=model, config={"arch": "gpt", "model": values}, tokenizer=tok)
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    return d, model.eval(), tok


def reference_nll(model, ids, context, stride):
    """Token by token: token t (t >= 1) is predicted from the window that scores it, rebuilt by hand:
    the first window covers tokens 0..context; window k starts at k * stride and scores the tokens past
    the previous window's end."""
    total, n = 0.0, 0
    starts = [0]
    while starts[-1] + context + 1 < len(ids):
        starts.append(starts[-1] + stride)
    scored = 0  # tokens 1..scored are done
    for s in starts:
        end = min(s + context + 1, len(ids))
        for t in range(max(scored + 1, s + 1), end):
            with torch.no_grad():
                logits = model(torch.tensor([ids[s:t]]))
            total += float(F.cross_entropy(logits[0, -1:], torch.tensor([ids[t]])))
            n += 1
        scored = end - 1
    assert n == len(ids) - 1  # every token but the first, once
    return total / n


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_perplexity_equals_token_by_token(tiny_gpt, tmp_path, stride):
    d, model, tok = tiny_gpt
    report = run_verb("evaluate", [str(d / "ckpt"), "--data", str(d / "text.txt"), "--stride", str(stride),
                                   "--out", str(tmp_path / "rep"), "--batch_size", "3"])
    ids = tok.encode(TEXT)
    ref = reference_nll(model, ids, 16, stride)
    assert report["metrics"]["tokens"] == len(ids) - 1
    assert report["metrics"]["loss"] == pytest.approx(ref, abs=1e-5)
    assert report["metrics"]["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["settings"]["stride"] == stride and "perplexity" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.parametrize("stride", [None, 7])
def test_ngram_perplexity_equals_token_by_token(tmp_path, stride):
    """An n-gram run's perplexity: every token scored once from its own history, equal to the model's full
    next-token distribution (`forward`) read token by token."""
    import numpy as np

    from lmforge.config import to_dict
    from lmforge.models.ngram import NGramConfig, NGramLM

    tok = train_tokenizer([TEXT], kind="bpe", vocab_size=280, min_frequency=1)
    words = TEXT.split()
    text = " ".join(random.Random(0).choice(words) for _ in range(900))  # longer than one 512-token window
    ids = tok.encode(text)
    assert len(ids) > 600
    model = NGramLM.count(np.asarray(tok.encode(TEXT)), NGramConfig(vocab_size=tok.vocab_size, order=3))
    save_checkpoint(tmp_path / "ng", model=model, config={"arch": "ngram", "model": to_dict(model.config)}, tokenizer=tok)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    args = [str(tmp_path / "ng"), "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "rep")]
    report = run_verb("evaluate", args + (["--stride", str(stride)] if stride else []))
    ref = reference_nll(model.eval(), ids, 512, stride or 256)
    assert report["metrics"]["tokens"] == len(ids) - 1 and report["arch"] == "ngram"
    assert report["metrics"]["loss"] == pytest.approx(ref, abs=1e-5)


def test_perplexity_errors(tiny_gpt, tmp_path, capsys):
    d, _, _ = tiny_gpt
    assert main(["evaluate", str(d / "ckpt"), "--data", str(d / "text.txt"), "--stride", "17",
                 "--out", str(tmp_path / "r")]) == 2
    assert "stride must be in [1, 16]" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("a")
    assert main(["evaluate", str(d / "ckpt"), "--data", str(tmp_path / "one.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "fewer than 2 tokens" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def write_base_and_tables(tmp_path, seed: int, n_train: int, n_dev: int) -> None:
    """TMP_PATH/{train,dev}.tsv (sentence, label: pos/neg) and a 1-layer BERT base TMP_PATH/base."""
    from test_finetune import sentence, write_table

    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        write_table(tmp_path / f"{split}.tsv", [(sentence(rng, lab), lab) for lab in
                                                 (rng.choice(["pos", "neg"]) for _ in range(n))])
    texts = [l.split("\t")[0] for l in (tmp_path / "train.tsv").read_text().splitlines()[1:]]
    tok = train_tokenizer(texts, kind="wordpiece", vocab_size=100, min_frequency=1)
    values = {"vocab_size": tok.vocab_size, "max_position": 32, "n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32}
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", model=build_model("bert", values), config={"arch": "bert", "model": values},
                    tokenizer=tok)


def test_ablation_end_to_end(tmp_path):
    write_base_and_tables(tmp_path, seed=3, n_train=96, n_dev=32)
    report = run_verb("ablation", ["--task", "classify", "--init_from", str(tmp_path / "base"),
                                   "--data.train", str(tmp_path / "train.tsv"), "--data.dev", str(tmp_path / "dev.tsv"),
                                   "--data.text", "sentence", "--data.label", "label", "--train.max_steps", "6",
                                   "--train.eval_every", "3", "--train.batch_size", "16", "--train.lr", "1e-3",
                                   "--train.device", "cpu", "--seeds", "[1, 2]", "--name", "abl",
                                   "--runs_dir", str(tmp_path / "runs")])
    root = tmp_path / "runs" / "abl"
    for f in ("report.md", "report.json", "curves.png"):
        assert (root / f).is_file()
    for arm in ("base", "random"):
        per_seed = report["arms"][arm]["per_seed"]
        assert [p["seed"] for p in per_seed] == [1, 2]
        devs = [p["dev"] for p in per_seed]
        assert report["arms"][arm]["dev"][0] == pytest.approx(sum(devs) / 2)
        for seed in (1, 2):
            cfg = (root / f"{arm}-seed{seed}" / "config.yaml").read_text()
            assert f"seed: {seed}" in cfg
    # the base arm starts from the saved weights, the random arm from a fresh init of the same shape
    assert "random init" in (root / "random-seed1" / "config.yaml").read_text()
    md = (root / "report.md").read_text()
    assert "pretrained" in md and "random init" in md and "+-" in md
    # the shared recipe is in the report (what both arms were trained with)
    assert "- recipe: lr 0.001 (linear, warm-up 0 steps); batch 16; weight decay 0.01; precision auto" in md
    assert report["recipe"]["train"]["lr"] == 1e-3 and "seed" not in report["recipe"]["train"]
    # refusing to run over an existing ablation without --overwrite
    with pytest.raises(Exception, match="--overwrite"):
        run_verb("ablation", ["--task", "classify", "--init_from", str(tmp_path / "base"), "--data.train",
                              str(tmp_path / "train.tsv"), "--data.dev", str(tmp_path / "dev.tsv"), "--name", "abl",
                              "--runs_dir", str(tmp_path / "runs")])


@pytest.fixture
def tiny_ablation(tmp_path):
    """A 1-layer BERT base and a small sentiment-like table; returns (args for `ablation`, runs dir)."""
    write_base_and_tables(tmp_path, seed=5, n_train=64, n_dev=24)
    args = ["--task", "classify", "--init_from", str(tmp_path / "base"), "--data.train", str(tmp_path / "train.tsv"),
            "--data.dev", str(tmp_path / "dev.tsv"), "--data.text", "sentence", "--data.label", "label",
            "--train.max_steps", "4", "--train.eval_every", "2", "--train.batch_size", "16", "--train.lr", "1e-3",
            "--train.device", "cpu", "--train.threads", "1", "--seeds", "[1, 2]", "--runs_dir", str(tmp_path / "runs")]
    return args, tmp_path / "runs"


def test_ablation_jobs_give_the_serial_numbers(tiny_ablation, capfd):
    """Four fine-tunings in two processes at once: every run's dev curve equals the one-at-a-time run's."""
    args, runs = tiny_ablation
    serial = run_verb("ablation", [*args, "--name", "serial"])
    capfd.readouterr()
    parallel = run_verb("ablation", [*args, "--name", "parallel", "--jobs", "2"])
    # the workers' evaluation lines say whose they are (they interleave on one terminal)
    lines = capfd.readouterr().out.splitlines()
    for tag in ("[base seed 1] step 2: val", "[random seed 2] step 4: val"):
        assert any(line.startswith(tag) for line in lines), lines
    assert not any(line.startswith("step ") for line in lines), lines
    for arm in ("base", "random"):
        assert parallel["arms"][arm]["per_seed"] and [
            (p["seed"], p["dev"], p["best_step"]) for p in parallel["arms"][arm]["per_seed"]] == [
            (p["seed"], p["dev"], p["best_step"]) for p in serial["arms"][arm]["per_seed"]]
        for seed in (1, 2):
            curves = []
            for name in ("serial", "parallel"):
                rows = read_metrics(runs / name / f"{arm}-seed{seed}" / "metrics.jsonl")
                curves.append([(r["step"], r["loss"]) for r in rows if r.get("split") == "train"])
            assert curves[0] and curves[0] == curves[1]
    assert parallel["delta_dev"] == serial["delta_dev"]
    assert (runs / "parallel" / "report.md").is_file()


def test_ablation_jobs_errors(tiny_ablation, capsys):
    args, runs = tiny_ablation
    assert main(["ablation", *args, "--name", "j0", "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "jobs must be a whole number of at least 1, got 0" in err
    assert not (runs / "j0").exists()
    # a mistake found inside a worker process reaches the user as the same one line, exit 2
    assert main(["ablation", *args, "--name", "bad", "--jobs", "2", "--task_args.pooling", "sideways"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pooling" in err and "sideways" in err, err
    assert not any((runs / "bad").glob("*/*"))


def _die_or_wait(kwargs):
    """A stand-in fine-tuning for a worker process: one writes its pid and sleeps; the other waits for that
    pid, then dies without a word (exit code 9)."""
    import os
    import time

    pid_file = kwargs["pid_file"]
    if kwargs["die"]:
        while not os.path.exists(pid_file):
            time.sleep(0.05)
        os._exit(9)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pid_file + ".tmp", pid_file)
    time.sleep(600)
    return {}


def test_a_worker_that_dies_is_named_and_the_others_stopped(tmp_path):
    """A worker killed without a word (as the kernel's out-of-memory killer does) is one clear error
    naming its arm, seed and exit code, and the other, still running, is stopped rather than waited for."""
    import os

    from lmforge.errors import LmforgeError
    from lmforge.recipes.ablation import _run_parallel

    pid_file = str(tmp_path / "pid")
    plan = [(1, "base"), (1, "random")]
    kwargs = {(1, "base"): {"die": False, "pid_file": pid_file}, (1, "random"): {"die": True, "pid_file": pid_file}}
    finished = []
    with pytest.raises(LmforgeError, match=r"the random arm's fine-tuning for seed 1 ended without a result: "
                                           r"its process exited with code 9 "):
        _run_parallel(plan, kwargs, 2, lambda key, value: finished.append(key), job=_die_or_wait)
    assert finished == []
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(int(open(pid_file).read()), 0)
