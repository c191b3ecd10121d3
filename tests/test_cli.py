"""The CLI: user mistakes give one clear line on stderr and exit code 2; the pipeline runs end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def run_cli(*args, cwd=None):
    """Run `python -m lmforge ARGS` in a subprocess: (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=600)
    return p.returncode, p.stdout, p.stderr


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def test_unknown_verb(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert "unknown verb 'pretrian'" in err and "did you mean 'pretrain'" in err


def test_help_lists_verbs(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in ("quickstart", "clean", "tokenizer", "prepare", "pretrain", "generate", "import", "export"):
        assert verb in out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A small prepared character-level corpus, built through the CLI."""
    tmp = tmp_path_factory.mktemp("data")
    corpus = tmp / "corpus.txt"
    text = "\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(60))
    corpus.write_text(text, encoding="utf-8")
    code, out, err = run_cli("tokenizer", corpus, "--kind", "char", "--out", tmp / "tok.json")
    assert code == 0, err
    code, out, err = run_cli("prepare", corpus, "--tokenizer", tmp / "tok.json", "--out", tmp / "prep")
    assert code == 0, err
    return tmp


def test_unknown_config_key_names_closest(tiny_data):
    code, _, err = run_cli("pretrain", "--data.path", tiny_data / "prep", "--train.lrr", "3")
    assert code == 2
    line = one_error_line(err)
    assert "--train.lrr" in line and "train.lr" in line


def test_unknown_model_key_names_closest(tiny_data, tmp_path):
    code, _, err = run_cli("pretrain", "--data.path", tiny_data / "prep", "--model.n_layers", "2",
                           "--runs_dir", tmp_path)
    assert code == 2
    line = one_error_line(err)
    assert "model.n_layers" in line and "n_layer" in line


def test_missing_data_dir(tmp_path):
    code, _, err = run_cli("pretrain", "--data.path", tmp_path / "nope", "--runs_dir", tmp_path)
    assert code == 2
    assert "nope" in one_error_line(err)


def test_unknown_preset(tmp_path):
    code, _, err = run_cli("pretrain", "--preset", "shakespear_char")
    assert code == 2
    assert "did you mean 'shakespeare_char'" in one_error_line(err)


def test_missing_input_file(tiny_data, tmp_path):
    code, _, err = run_cli("prepare", tmp_path / "missing.txt", "--tokenizer", tiny_data / "tok.json", "--out", tmp_path / "o")
    assert code == 2
    assert "missing.txt" in one_error_line(err)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    code, _, err = run_cli("tokenizer", tmp_path / "empty.txt", "--kind", "char", "--out", tmp_path / "t.json")
    assert code == 2
    assert "empty.txt" in one_error_line(err) or "empty" in one_error_line(err)


def test_non_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, _, err = run_cli("tokenizer", tmp_path / "latin1.txt", "--kind", "char", "--out", tmp_path / "t.json")
    assert code == 2
    line = one_error_line(err)
    assert "latin1.txt" in line and "byte 3" in line


def test_pretrain_generate_resume_end_to_end(tiny_data, tmp_path):
    """prepare -> pretrain (GPT, char) -> generate; then a second invocation refuses to overwrite and
    --resume continues to a later step."""
    common = ["--data.path", tiny_data / "prep", "--data.seq_len", "32", "--model.n_layer", "1", "--model.n_head", "2",
              "--model.d_model", "32", "--train.batch_size", "4", "--train.eval_every", "5", "--train.log_every", "5",
              "--train.progress", "false", "--train.tensorboard", "true", "--runs_dir", tmp_path, "--name", "t"]
    code, out, err = run_cli("pretrain", *common, "--train.max_steps", "10")
    assert code == 0, err
    run = tmp_path / "t"
    assert (run / "checkpoints" / "step-10" / "model.safetensors").is_file()
    assert (run / "loss.png").is_file() and any((run / "tensorboard").iterdir())
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "val"}
    code, _, err = run_cli("pretrain", *common, "--train.max_steps", "10")
    assert code == 2 and "--resume" in one_error_line(err)
    code, out, err = run_cli("pretrain", *common, "--train.max_steps", "15", "--resume", "latest")
    assert code == 0, err
    assert (run / "checkpoints" / "step-15").is_dir()
    code, out, err = run_cli("generate", run, "--prompt", "document", "--max_new_tokens", "12", "--seed", "1")
    assert code == 0, err
    assert "document" in out


def test_init_from_starts_at_the_base_model(tiny_data, tmp_path):
    """--init_from loads the pretrained weights: the new run's first validation equals the base's last."""
    from lmforge.errors import ConfigError
    from lmforge.recipes.pretrain import DataConfig, pretrain
    from lmforge.train.config import TrainConfig

    data = DataConfig(path=str(tiny_data / "prep"), seq_len=32)
    train = TrainConfig(max_steps=6, batch_size=4, eval_every=0, progress=False, tensorboard=False, device="cpu")
    base = pretrain(data=data, model={"n_layer": 1, "n_head": 2, "d_model": 32}, train=train, runs_dir=str(tmp_path), name="base")

    tuned = pretrain(data=data, train=TrainConfig(max_steps=1, batch_size=4, eval_every=0, progress=False, tensorboard=False,
                                                  device="cpu", lr=1e-12, min_lr=0.0, warmup_steps=0),
                     runs_dir=str(tmp_path), name="tuned", init_from=base["checkpoint"])
    assert tuned["val"]["loss"] == pytest.approx(base["val"]["loss"], abs=1e-6)
    with pytest.raises(ConfigError, match="do not also give --model"):
        pretrain(data=data, model={"n_layer": 2}, train=train, runs_dir=str(tmp_path), name="x", init_from=base["checkpoint"])


def test_activation_checkpointing_option_trains_identically(tiny_data, tmp_path):
    """train.activation_checkpointing recomputes block activations in backward: with dropout on, the losses,
    validation and saved weights equal the plain run's bit for bit; resuming such a run works; LSTM and
    negative values are refused clearly."""
    import torch
    from safetensors.torch import load_file

    from lmforge.errors import ConfigError
    from lmforge.recipes.pretrain import DataConfig, pretrain
    from lmforge.train.config import TrainConfig

    data = DataConfig(path=str(tiny_data / "prep"), seq_len=32)
    model = {"n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.2}

    def run(name, steps, every, resume=None):
        train = TrainConfig(max_steps=steps, batch_size=4, eval_every=0, log_every=1, save_every=3, progress=False,
                            tensorboard=False, device="cpu", activation_checkpointing=every)
        return pretrain(data=data, model=model, train=train, runs_dir=str(tmp_path), name=name, resume=resume)

    plain, ckpt = run("plain", 6, 0), run("ckpt", 6, 1)
    assert ckpt["val"] == plain["val"]
    train_losses = [[json.loads(l)["loss"] for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                     if json.loads(l)["split"] == "train"] for n in ("plain", "ckpt")]
    assert train_losses[0] == train_losses[1] and len(train_losses[0]) == 6
    a, b = load_file(f"{plain['checkpoint']}/model.safetensors"), load_file(f"{ckpt['checkpoint']}/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = run("ckpt", 8, 2, resume="latest")
    assert resumed["step"] == 8
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        TrainConfig(activation_checkpointing=-1)
    with pytest.raises(ConfigError, match="arch lstm has no Transformer blocks"):
        pretrain(data=data, arch="lstm", train=TrainConfig(max_steps=1, device="cpu", activation_checkpointing=1),
                 runs_dir=str(tmp_path), name="lstm")
