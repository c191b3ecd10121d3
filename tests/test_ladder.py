"""`lmforge ladder`: every rung on one prepared dataset, scored on pretrain's validation windows, at about
one parameter count; the report, the plot, resuming, and the clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.recipes.ladder import _curve, _matched_recurrent, ladder, val_nats, val_windows
from lmforge.recipes.pretrain import DataConfig


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small character corpus (prepared with a validation split) and a tiny GPT preset."""
    from lmforge.data.prepare import prepare
    from lmforge.text.tokenizer import build_char

    tmp = tmp_path_factory.mktemp("ladder")
    text = "\n\n".join(f"the cat sat on the mat {i % 5}. a dog ran after it {i % 3}." for i in range(120))
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    build_char(sorted(set(text))).save(tmp / "tok.json")
    prepare([str(tmp / "corpus.txt")], str(tmp / "prep"), str(tmp / "tok.json"), workers=1)
    (tmp / "tiny_gpt.yaml").write_text(
        "arch: gpt\nmodel: {n_layer: 1, n_head: 2, d_model: 16, block_size: 16, dropout: 0.0}\n"
        "data: {seq_len: 16}\n"
        "train: {batch_size: 4, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 5, device: cpu, threads: 1}\n")
    return tmp


def test_val_windows_are_pretrains_validation_batches(prepared):
    """The ladder scores exactly the windows `CLMBatcher.val_batches` yields, and val_nats equals the CLM
    objective's loss over them, averaged as the trainer averages it."""
    from lmforge.data.clm import CLMBatcher
    from lmforge.data.shards import open_prepared
    from lmforge.models import build_model
    from lmforge.train.clm import CLMObjective

    train, val, tok = open_prepared(prepared / "prep")
    windows = val_windows(val.tokens, 16)
    batches = list(CLMBatcher(train, val, seq_len=16, batch_size=7, seed=0).val_batches())
    torch.testing.assert_close(torch.cat([b["input_ids"] for b in batches]), torch.from_numpy(windows[:, :-1]))
    torch.testing.assert_close(torch.cat([b["labels"] for b in batches]), torch.from_numpy(windows[:, 1:]))
    torch.manual_seed(0)
    net = build_model("lstm", {"vocab_size": tok.vocab_size, "d_model": 8, "d_hidden": 8, "n_layer": 1, "cell": "gru"}).eval()
    with torch.no_grad():
        sums = [(CLMObjective().loss(net, b)[0].item(), len(b["input_ids"])) for b in batches]
    want = sum(l * n for l, n in sums) / sum(n for _, n in sums)
    assert abs(val_nats(net, windows) - want) < 1e-5


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_recurrent_size_is_the_closest_to_the_target(cell):
    from lmforge.models import build_model
    from lmforge.models.gpt import GPTConfig

    gpt = GPTConfig(vocab_size=65, n_layer=4, n_head=4, d_model=128, block_size=64, dropout=0.0)
    target = sum(p.numel() for p in build_model("gpt", gpt).parameters())
    values = _matched_recurrent(cell, gpt, 2, target, 65)

    def params(h):
        return sum(p.numel() for p in build_model("lstm", {**values, "d_hidden": h}).parameters())

    best = params(values["d_hidden"])
    # brute force around the answer: no hidden size is closer to the target
    for h in range(max(1, values["d_hidden"] - 30), values["d_hidden"] + 30):
        assert abs(params(h) - target) >= abs(best - target)
    assert abs(best - target) / target < 0.01 and values["cell"] == cell and values["d_model"] == 128


def test_curve_reads_train_seconds(tmp_path):
    lines = [{"step": 5, "split": "train", "loss": 3.0, "tokens_per_s": 10.0},
             {"step": 5, "split": "val", "loss": 2.5, "train_s": 1.5},
             {"step": 10, "split": "val", "loss": 2.0, "train_s": 3.0}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _curve(tmp_path / "m.jsonl") == [[5, 1.5, 2.5], [10, 3.0, 2.0]]


def test_ladder_end_to_end_report_and_resume(prepared, tmp_path, capsys):
    from lmforge.recipes.generate import generate
    from lmforge.train.checkpoint import load_pretrained

    out = tmp_path / "lad"
    report = ladder(DataConfig(path=str(prepared / "prep")), gpt=str(prepared / "tiny_gpt.yaml"), out=str(out),
                    rungs=["ngram", "rnn", "gpt"], budget_s=0.3, max_order=4, curve_points=2, curve_batches=2,
                    probe_steps=6, probe_rounds=2)
    rows = {r["rung"]: r for r in report["rows"]}
    assert list(rows) == ["ngram", "rnn", "gpt"]
    for name in ("report.md", "report.json", "val_loss_vs_time.png"):
        assert (out / name).is_file()
    assert (out / "val_loss_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| n-gram (KN) |" in md and "| RNN |" in md and "| GPT |" in md
    # the n-gram rung keeps the best order, and its score is the counted model's on the windows
    orders = rows["ngram"]["orders"]
    assert [o["order"] for o in orders] == [1, 2, 3, 4]
    assert rows["ngram"]["val_nats"] == min(o["val_nats"] for o in orders)
    train_tokens = report["settings"]["train_tokens"]
    assert rows["ngram"]["train_tokens"] == train_tokens
    # every rung's figure equals scoring its saved run again; the recurrent rung matches the GPT's size
    windows = val_windows(np.fromfile(prepared / "prep" / "val.bin", dtype=np.uint16), 16)
    for name, row in rows.items():
        net, _, cfg = load_pretrained(row["run_dir"])
        assert abs(val_nats(net, windows) - row["val_nats"]) < 1e-5
        assert abs(row["ppl"] - np.exp(row["val_nats"])) < 1e-6 * row["ppl"]
    target = report["settings"]["target_params"]
    assert rows["gpt"]["params"] == target and abs(rows["rnn"]["params"] - target) / target < 0.05
    for name in ("rnn", "gpt"):  # the steps are what the probed speed fits into the budget
        assert rows[name]["steps"] == max(1, int(0.3 * rows[name]["probe_tokens_per_s"] / (4 * 16)))
        assert rows[name]["train_s"] <= 0.3 + 1e-9 or rows[name]["steps"] == 1
        assert rows[name]["curve"][-1][0] == rows[name]["steps"] and rows[name]["wall_s"] == rows[name]["curve"][-1][1]
    assert len(rows["gpt"]["curve"]) >= 2 and not (out / ".probe").exists()
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(rows["gpt"]["curve"], rows["gpt"]["curve"][1:]))
    assert generate(row["run_dir"], prompt="the", max_new_tokens=4, strategy="greedy")
    # resuming reuses finished rungs as they are
    before = (out / "rnn" / "ladder.json").stat().st_mtime_ns
    again = ladder(DataConfig(path=str(prepared / "prep")), gpt=str(prepared / "tiny_gpt.yaml"), out=str(out),
                   rungs=["ngram", "rnn", "gpt"], budget_s=0.3, max_order=4, curve_points=2, curve_batches=2,
                   probe_steps=6, resume=True)
    assert again["rows"] == report["rows"]
    assert (out / "rnn" / "ladder.json").stat().st_mtime_ns == before
    capsys.readouterr()


def _one_line_exit_2(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_errors_are_one_line(prepared, tmp_path, capsys):
    base = ["ladder", "--data.path", str(prepared / "prep"), "--gpt", str(prepared / "tiny_gpt.yaml"),
            "--out", str(tmp_path / "x")]
    assert "unknown rung 'lstn' (did you mean 'lstm'?)" in _one_line_exit_2(base + ["--rungs", "[ngram, lstn]"], capsys)
    assert "budget_s must be > 0" in _one_line_exit_2(base + ["--budget_s", "0"], capsys)
    assert "max_order must be at least 1" in _one_line_exit_2(base + ["--max_order", "0"], capsys)
    assert "smoothing must be" in _one_line_exit_2(base + ["--smoothing", "witten_bell"], capsys)
    line = _one_line_exit_2(["ladder", "--data.path", str(prepared / "prep"), "--gpt", "bert_en_small"], capsys)
    assert "needs a gpt preset" in line
    line = _one_line_exit_2(base + ["--train.lrr", "1e-3", "--rungs", "[rnn]"], capsys)
    assert "train.lrr" in line and "did you mean 'lr'" in line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    line = _one_line_exit_2(base[:-1] + [str(tmp_path / "full")], capsys)
    assert "not empty" in line and "--resume true" in line
    line = _one_line_exit_2(["ladder", "--data.path", str(tmp_path / "nowhere"), "--gpt", str(prepared / "tiny_gpt.yaml")], capsys)
    assert "nowhere" in line
    line = _one_line_exit_2(base + ["--rungs", "[rnn, rnn]"], capsys)
    assert "each rung once" in line
    line = _one_line_exit_2(base + ["--data.seq_len", "100000"], capsys)
    assert "validation split longer than seq_len 100000" in line


@pytest.mark.parametrize("name,value,low", [("recurrent_layers", 0, 1), ("curve_points", 0, 1), ("curve_batches", 0, 1),
                                            ("probe_steps", 5, 6), ("probe_rounds", 0, 1)])
def test_counts_below_their_minimum_are_refused(prepared, name, value, low):
    with pytest.raises(ConfigError, match=f"{name} must be at least {low}, got {value}"):
        ladder(DataConfig(path=str(prepared / "prep")), gpt=str(prepared / "tiny_gpt.yaml"), **{name: value})
