"""Never lose a user's data or a run: crash-safe checkpoints and metrics, non-finite losses, progress
under a pipe, and every config value checked up front with a clear error."""
from __future__ import annotations

import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.data.clm import CLMBatcher
from lmforge.errors import CheckpointError, ConfigError
from lmforge.train.checkpoint import (
    MARKER,
    clean_stale_checkpoints,
    find_checkpoint,
    is_complete,
    save_checkpoint,
    step_checkpoints,
)
from lmforge.train.clm import CLMObjective
from lmforge.train.config import TrainConfig, check_device
from lmforge.train.trainer import DivergedError, MetricsLog, Progress, Trainer, plot_curves, read_metrics


class TinyLM(nn.Module):
    def __init__(self, vocab=17, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.drop(torch.tanh(self.emb(ids))))


def _tokens(n, seed):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(tokens=(np.cumsum(rng.choice([1, 1, 2], size=n)) % 17).astype(np.uint16))


def make_trainer(run_dir, objective=None, **kw):
    values = dict(max_steps=8, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, log_every=1,
                  tensorboard=False, progress=False, seed=3, device="cpu")
    values.update(kw)
    cfg = TrainConfig(**values)
    torch.manual_seed(cfg.seed)
    batcher = CLMBatcher(_tokens(3000, 0), _tokens(400, 1), seq_len=8, batch_size=4, seed=cfg.seed)
    return Trainer(TinyLM(), objective or CLMObjective(), batcher, cfg, run_dir, run_config={"arch": "tiny", "model": {}})


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"}


# ---- checkpoints: a marker written last; temporaries of a dead run removed ------------------------------
def test_checkpoint_marker_lists_every_file_and_detects_damage(tmp_path):
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "step-2", model=TinyLM(), config={"arch": "tiny", "model": {}},
                           trainer_state={"step": 2})
    marker = json.loads((ckpt / MARKER).read_text())
    assert set(marker["files"]) == {"config.yaml", "model.safetensors", "trainer_state.json"}
    assert all(marker["files"][n] == (ckpt / n).stat().st_size for n in marker["files"])
    assert is_complete(ckpt) and find_checkpoint(tmp_path / "run") == ckpt
    # a damaged (truncated) file makes it incomplete: not picked, and named when asked for directly
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-10])
    assert not is_complete(ckpt) and step_checkpoints(tmp_path / "run") == []
    with pytest.raises(CheckpointError, match=r"step-2: incomplete checkpoint"):
        find_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"holds no complete checkpoints/step-N"):
        find_checkpoint(tmp_path / "run")


def test_newest_complete_checkpoint_wins_and_stale_temporaries_go(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        save_checkpoint(run / "checkpoints" / f"step-{step}", model=TinyLM(), config={"arch": "tiny", "model": {}})
    # a newer one without its marker's files intact, and a half-written temporary of a killed save
    (run / "checkpoints" / "step-6").mkdir()
    (run / "checkpoints" / "step-6" / MARKER).write_text(json.dumps({"format": 1, "files": {"model.safetensors": 99}}))
    (run / "checkpoints" / ".step-8.x1y2.tmp").mkdir()
    (run / "checkpoints" / ".step-8.x1y2.tmp" / "model.safetensors").write_bytes(b"half")
    assert find_checkpoint(run).name == "step-4"
    done = clean_stale_checkpoints(run)
    assert len(done) == 1 and not (run / "checkpoints" / ".step-8.x1y2.tmp").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]


# ---- metrics.jsonl: valid JSON always, a torn last line does not stop resume --------------------------------
def test_torn_metrics_line_does_not_stop_resume(tmp_path, capsys):
    import shutil

    full = tmp_path / "full"
    make_trainer(full, max_steps=8, save_every=4).fit()
    # the same run killed at step 7 while writing its metrics line: the newest checkpoint is step 4
    run = tmp_path / "run"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step-8")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:25])
    assert find_checkpoint(run).name == "step-4"
    make_trainer(run, max_steps=8, save_every=4).fit(resume=run)
    assert "line 7 is not a whole metrics record" in capsys.readouterr().err
    assert train_losses(run) == train_losses(full)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_metrics_write_non_finite_as_null(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write(1, "train", {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1})
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(text) == {"step": 1, "split": "train", "loss": None, "grad_norm": None, "lr": 0.1}
    assert "NaN" not in text and "Infinity" not in text
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None  # nothing finite to draw


# ---- non-finite losses: the step is skipped; too many in a row stop the run --------------------------------
class FlakyCLM(CLMObjective):
    """CLM whose loss is NaN at the given (0-based) steps; the step counter follows the train batches."""

    def __init__(self, bad_steps):
        super().__init__()
        self.bad_steps, self.calls = set(bad_steps), 0

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        if model.training:
            step, self.calls = self.calls, self.calls + 1
            if step in self.bad_steps:
                loss = loss * float("nan")
        return loss, metrics


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw-skips-on-device", "other-optimizers-sync"])
def test_nonfinite_step_is_skipped_with_a_warning(tmp_path, capsys, fused):
    trainer = make_trainer(tmp_path / "run", FlakyCLM({3}), max_steps=6)
    assert trainer._fused_optimizer()  # on CPU and CUDA the trainer's AdamW is the fused one
    if not fused:
        trainer._fused_optimizer = lambda: False
    before = {}

    real_step = trainer._train_step

    def spy(step):
        before[step] = [p.detach().clone() for p in trainer.raw_model.parameters()]
        return real_step(step)

    trainer._train_step = spy
    trainer.fit()
    err = capsys.readouterr().err
    assert "warning: 1 step(s) up to step 4 had a non-finite loss or gradient and were skipped (no update; " \
           "the last: step 4)" in err
    # step index 3 changed nothing: the weights before step 4 equal those before step 3
    for a, b in zip(before[3], before[4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(int(st["step"]) == 5 for st in trainer.optimizer.state.values())  # 6 steps, one skipped
    losses = train_losses(tmp_path / "run")
    assert losses[4] is None and all(math.isfinite(losses[s]) for s in (1, 2, 3, 5, 6))
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_diverged_run_stops_with_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path / "run", FlakyCLM(range(2, 100)), max_steps=20, max_nonfinite_steps=3)
    with pytest.raises(DivergedError, match=r"training diverged: 4 steps in a row had a non-finite loss or gradient "
                                            r"\(the last: step 6; train\.max_nonfinite_steps=3\); lower train\.lr, "
                                            r"lengthen train\.warmup_steps"):
        trainer.fit()


# ---- progress under a pipe: one line every N seconds ---------------------------------------------------------
def test_progress_under_a_pipe_prints_a_line_every_n_seconds():
    out = io.StringIO()  # not a terminal
    now = [0.0]
    bar = Progress(total=100, initial=0, every=10.0, stream=out, clock=lambda: now[0])
    for step in range(100):
        now[0] += 0.25  # a step every 0.25 s: a line every 40 steps
        bar.update(1)
        bar.set_postfix(loss=f"{3 - step / 100:.2f}", refresh=False)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [ln.split()[2] for ln in lines] == ["40/100", "80/100", "100/100"]
    assert lines[0].startswith("train step 40/100 (40%)  loss 2.62  4.00 step/s  elapsed 0:00:10  eta 0:00:15")


# ---- config values checked up front -----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("log_every", 0, "train.log_every must be at least 1, got 0"),
    ("threads", -1, "train.threads must be at least 1 (or null), got -1"),
    ("device", "foo", "train.device: 'foo' is not a device"),
    ("beta1", -0.1, "train.beta1 must be in [0, 1), got -0.1"),
    ("beta2", 2.0, "train.beta2 must be in [0, 1), got 2.0"),
    ("eps", -1.0, "train.eps must be > 0, got -1.0"),
    ("weight_decay", -1.0, "train.weight_decay and train.grad_clip must be >= 0"),
    ("grad_clip", -1.0, "train.weight_decay and train.grad_clip must be >= 0"),
    ("eval_every", -1, "train.eval_every must be >= 0, got -1"),
    ("save_every", -1, "train.save_every must be >= 0, got -1"),
    ("keep_checkpoints", 0, "train.keep_checkpoints must be at least 1, got 0"),
    ("eval_batches", 0, "train.eval_batches must be at least 1 (or null), got 0"),
    ("decay_steps", 0, "train.decay_steps must be at least 1 (or null), got 0"),
    ("seed", -1, "train.seed must be >= 0, got -1"),
    ("lr", float("nan"), "train.lr must be a finite number, got nan"),
    ("max_nonfinite_steps", -1, "train.max_nonfinite_steps must be >= 0, got -1"),
    ("progress_every", 0.0, "train.progress_every must be > 0 seconds, got 0.0"),
])
def test_train_config_ranges(field, value, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert message in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.device: 'cuda' but this machine has no CUDA device"):
        check_device("cuda", "train.device")
    with pytest.raises(ConfigError, match=r"train\.device: 'cuda:1' but this machine has no CUDA device"):
        make_trainer(tmp_path / "run", device="cuda:1")
    assert not (tmp_path / "run").exists()


# ---- a recurrent model reads a long prompt in chunks: bounded memory, the same continuation -------------------
def test_recurrent_prompt_is_read_in_chunks(monkeypatch):
    import lmforge.generation as generation
    from lmforge.models import build_model

    torch.manual_seed(0)
    net = build_model("lstm", {"vocab_size": 23, "d_model": 16, "n_layer": 2}).eval()
    prompts = [list(np.random.default_rng(1).integers(0, 23, size=n)) for n in (50, 37)]
    prompts = [[int(t) for t in p] for p in prompts]
    whole = generation.generate(net, prompts, max_new_tokens=6, pad_token_id=0)
    seen = []
    real_forward = net.forward

    def spy(ids, **kw):
        seen.append(ids.shape[1])
        return real_forward(ids, **kw)

    monkeypatch.setattr(generation, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(net, "forward", spy)
    chunked = generation.generate(net, prompts, max_new_tokens=6, pad_token_id=0)
    assert chunked == whole
    assert max(seen) == 8 and seen[:7] == [8] * 6 + [2]  # 50 prompt tokens: 6 chunks of 8, then 2


# ---- the verbs: one clear line and exit 2, nothing destroyed, nothing half-made ----------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A char-level prepared corpus and a 2-step GPT run, made through the verbs."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "corpus.txt").write_text("\n\n".join(f"doc {i}: the quick brown fox {i % 5}." for i in range(40)))
    assert cli(["tokenizer", str(d / "corpus.txt"), "--kind", "char", "--out", str(d / "tok.json")]) == 0
    assert cli(["prepare", str(d / "corpus.txt"), "--tokenizer", str(d / "tok.json"), "--out", str(d / "prep")]) == 0
    assert cli(["pretrain", *GPT, "--train.max_steps", "2", "--runs_dir", str(d / "runs"), "--name", "gpt",
                 "--data.path", str(d / "prep")]) == 0
    return d


GPT = ["--data.seq_len", "16", "--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "16",
       "--train.batch_size", "2", "--train.progress", "false", "--train.tensorboard", "false", "--train.device", "cpu"]


def cli(argv) -> int:
    """Run `lmforge ARGV` in-process; its exit code."""
    from lmforge.cli import main

    return main([str(a) for a in argv])


def error_line(capsys, argv) -> str:
    """Run a verb in-process: it must exit 2 with exactly one line on stderr; that line."""
    capsys.readouterr()
    code = cli(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_export_and_import_never_destroy(tiny, tmp_path, capsys):
    run = tiny / "runs" / "gpt"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "afile").write_text("precious")
    before = tree(tmp_path)
    for verb in (["export", run, "--format", "hf"], ["import", tiny / "hf", "--out"]):
        if verb[0] == "import":
            assert cli(["export", run, "--format", "hf", tiny / "hf"]) == 0
        assert "taken: exists and is not empty; pass --overwrite" in error_line(capsys, verb + [tmp_path / "taken"])
        assert "afile: exists and is a file; the output is a folder" in error_line(capsys, verb + [tmp_path / "afile", "--overwrite"])
        assert "taken: exists and does not look like this verb's output" in error_line(
            capsys, verb + [tmp_path / "taken", "--overwrite"])
        assert tree(tmp_path) == before  # nothing renamed aside, nothing added
        assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "precious"
    # its own earlier output: refused without --overwrite, replaced with it
    assert cli(["export", run, "--format", "hf", tmp_path / "hf"]) == 0
    assert "hf: exists and is not empty; pass --overwrite" in error_line(capsys, ["export", run, "--format", "hf", tmp_path / "hf"])
    assert cli(["export", run, "--format", "hf", tmp_path / "hf", "--overwrite"]) == 0
    assert cli(["import", tmp_path / "hf", "--out", tmp_path / "ckpt"]) == 0
    assert "ckpt: exists and is not empty" in error_line(capsys, ["import", tmp_path / "hf", "--out", tmp_path / "ckpt"])
    assert cli(["import", tmp_path / "hf", "--out", tmp_path / "ckpt", "--overwrite"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoint_and_export_files_honour_the_umask(tiny, tmp_path, mask):
    import os

    old = os.umask(mask)
    try:
        assert cli(["export", tiny / "runs" / "gpt", "--format", "hf", tmp_path / "hf"]) == 0
        save_checkpoint(tmp_path / "ckpt", model=TinyLM(), config={"arch": "tiny", "model": {}}, trainer_state={"step": 1})
    finally:
        os.umask(old)
    for folder in (tmp_path / "hf", tmp_path / "ckpt"):
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~mask
        for f in folder.iterdir():
            assert os.stat(f).st_mode & 0o777 == 0o666 & ~mask, f


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("extra,message", [
    (["--train.log_every", "0"], "train.log_every must be at least 1, got 0"),
    (["--train.threads", "-1"], "train.threads must be at least 1 (or null), got -1"),
    (["--train.device", "foo"], "train.device: 'foo' is not a device"),
    pytest.param(["--train.device", "cuda"], "train.device: 'cuda' but this machine has no CUDA device", marks=NO_CUDA),
    (["--train.beta2", "2"], "train.beta2 must be in [0, 1), got 2.0"),
    (["--train.eps", "-1"], "train.eps must be > 0, got -1.0"),
    (["--data.seq_len", "-4"], "data.seq_len must be at least 1, got -4"),
    (["--name", "../../x"], "name: '../../x' must be a folder name inside --runs_dir"),
    (["--name", "/tmp/elsewhere"], "name: '/tmp/elsewhere' must be a folder name inside --runs_dir"),
    (["--resume", "nowhere/ckpt"], "nowhere/ckpt: no such run or checkpoint directory"),
    (["--overwrite", "--resume", "latest"], "--resume continues a run and --overwrite replaces it"),
    (["--objective", "mlm"], "masked-LM training needs a tokenizer with [PAD] [CLS] [SEP] [MASK]"),
])
def test_pretrain_bad_values_fail_before_anything_is_made(tiny, tmp_path, capsys, extra, message):
    runs = tmp_path / "sub" / "runs"
    argv = ["pretrain", *GPT, "--train.max_steps", "1", "--data.path", tiny / "prep", "--runs_dir", runs]
    if "--name" not in extra:
        argv += ["--name", "r"]
    assert message in error_line(capsys, argv + extra)
    assert not (tmp_path / "sub").exists() and not (tmp_path.parent / "x").exists()


def test_pretrain_existing_run_needs_resume_or_overwrite(tiny, tmp_path, capsys):
    argv = ["pretrain", *GPT, "--train.max_steps", "2", "--data.path", tiny / "prep", "--runs_dir", tmp_path]
    assert cli(argv + ["--name", "r"]) == 0
    line = error_line(capsys, argv + ["--name", "r"])
    assert "r already holds checkpoints (newest step-2); pass --resume latest" in line and "--overwrite" in line
    (tmp_path / "r" / "notes.txt").write_text("mine")  # --overwrite replaces the run's outputs, nothing else
    (tmp_path / "r" / "checkpoints" / "step-1").mkdir()
    assert cli(argv + ["--name", "r", "--overwrite", "--train.max_steps", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["checkpoints", "config.yaml", "loss.png",
                                                                  "metrics.jsonl", "notes.txt"]
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-1"]
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"
    (tmp_path / "f").write_text("mine")
    assert "f: exists and is a file; a run is a folder" in error_line(capsys, argv + ["--name", "f", "--overwrite"])
    # a folder that holds other things (quickstart's data and tokenizer) takes a run beside them
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "tokenizer.json").write_text("{}")
    assert cli(argv + ["--name", "q"]) == 0 and (tmp_path / "q" / "tokenizer.json").read_text() == "{}"


@pytest.fixture(scope="module")
def bert_run(tiny):
    """A 1-step BERT masked-LM run on the same corpus (wordpiece tokenizer)."""
    d = tiny
    assert cli(["tokenizer", d / "corpus.txt", "--kind", "wordpiece", "--vocab_size", "60", "--out", d / "wp.json"]) == 0
    assert cli(["prepare", d / "corpus.txt", "--tokenizer", d / "wp.json", "--out", d / "prep_wp"]) == 0
    assert cli(["pretrain", "--arch", "bert", "--objective", "mlm", *GPT, "--train.max_steps", "1",
                "--data.path", d / "prep_wp", "--runs_dir", d / "runs", "--name", "bert"]) == 0
    return d / "runs" / "bert"


def test_other_verbs_bad_values_are_one_line(tiny, bert_run, tmp_path, capsys):
    gpt = tiny / "runs" / "gpt"
    (tmp_path / "s.txt").write_text("the quick fox\nthe lazy dog\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "taken.npy").write_bytes(b"mine")
    (tmp_path / "taken.png").write_bytes(b"mine")
    cases = [
        (["generate", bert_run, "--prompt", "doc"], "a BERT encoder does not generate text"),
        (["generate", gpt, "--device", "foo"], "device: 'foo' is not a device"),
        (["clean", tiny / "corpus.txt", "--out", tmp_path / "adir"], "adir: is a folder; the output is a file"),
        (["clean", tiny / "corpus.txt", "--out", tmp_path / "taken.npy"], "taken.npy: exists; pass --overwrite"),
        (["tokenizer", tiny / "corpus.txt", "--kind", "char", "--out", tiny / "tok.json"], "tok.json: exists; pass --overwrite"),
        (["prepare", tiny / "corpus.txt", "--tokenizer", tiny / "tok.json", "--out", tiny / "prep"],
         "prep: exists and is not empty; pass --overwrite"),
        (["embed", bert_run, tmp_path / "s.txt", tmp_path / "taken.npy"], "taken.npy: exists; pass --overwrite"),
        (["embed", bert_run, tmp_path / "s.txt", tmp_path / "e.npy", "--max_length", "2"], "max_length must be at least 3"),
        (["attention", gpt, "--text", "the fox", "--out", tmp_path / "taken.png"], "taken.png: exists; pass --overwrite"),
    ]
    if not torch.cuda.is_available():
        cases += [
            (["generate", gpt, "--device", "cuda"], "device: 'cuda' but this machine has no CUDA device"),
            (["embed", bert_run, tmp_path / "s.txt", tmp_path / "e.npy", "--device", "cuda:0"], "no CUDA device"),
            (["attention", gpt, "--text", "the fox", "--out", tmp_path / "a.png", "--device", "cuda"], "no CUDA device"),
            (["fill_mask", bert_run, "--text", "the [MASK] fox", "--device", "cuda"], "no CUDA device"),
        ]
    for argv, message in cases:
        assert message in error_line(capsys, argv), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "s.txt", "taken.npy", "taken.png"]
    assert (tmp_path / "taken.npy").read_bytes() == b"mine" and not any((tmp_path / "adir").iterdir())
    # with --overwrite they replace their own output
    assert cli(["embed", bert_run, tmp_path / "s.txt", tmp_path / "taken.npy", "--overwrite"]) == 0
    assert np.load(tmp_path / "taken.npy").shape[0] == 2
    assert cli(["tokenizer", tiny / "corpus.txt", "--kind", "char", "--out", tmp_path / "t.json"]) == 0
    assert cli(["tokenizer", tiny / "corpus.txt", "--kind", "char", "--out", tmp_path / "t.json", "--overwrite"]) == 0


# ---- real SIGKILLs: at a random step and while checkpoints are written; the resumed run is the same run -----------
DRIVER = '''
import os, signal, sys
import lmforge.train.checkpoint as checkpoint
import lmforge.train.trainer as trainer
from lmforge.cli import main

kind, _, arg = os.environ["KILL_PLAN"].partition(":")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "save":  # the N-th checkpoint save dies halfway through its weights file, or just before its marker
    n, stage = arg.split(":")
    calls = []
    real_tensors, real_json = checkpoint.save_tensors, checkpoint.atomic_write_json
    def save_tensors(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == int(n) and stage == "weights":
            with open(path, "wb") as f:
                f.write(b"half a file")
            die()
        return real_tensors(tensors, path, metadata)
    def atomic_write_json(path, obj):
        if len(calls) == int(n) and stage == "marker" and path.name == checkpoint.MARKER:
            die()
        return real_json(path, obj)
    checkpoint.save_tensors, checkpoint.atomic_write_json = save_tensors, atomic_write_json
elif kind == "step":  # dies inside optimizer step K, after the weights were updated (nothing logged yet)
    real_step = trainer.Trainer._train_step
    def _train_step(self, step):
        out = real_step(self, step)
        if step + 1 == int(arg):
            die()
        return out
    trainer.Trainer._train_step = _train_step
sys.exit(main(sys.argv[1:]))
'''


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(tiny, tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from lmforge.recipes.pretrain import DataConfig, pretrain

    model = {"n_layer": 1, "n_head": 2, "d_model": 16, "dropout": 0.1}
    steps = 30
    pretrain(data=DataConfig(path=str(tiny / "prep"), seq_len=16), model=model, runs_dir=str(tmp_path), name="ref",
             train=TrainConfig(max_steps=steps, batch_size=2, save_every=5, eval_every=10, log_every=1,
                               progress=False, tensorboard=False, device="cpu"))
    (tmp_path / "driver.py").write_text(DRIVER)
    argv = [sys.executable, str(tmp_path / "driver.py"), "pretrain", "--data.path", str(tiny / "prep"),
            "--data.seq_len", "16", "--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "16",
            "--model.dropout", "0.1", "--train.max_steps", str(steps), "--train.batch_size", "2",
            "--train.save_every", "5", "--train.eval_every", "10", "--train.log_every", "1", "--train.threads", "1",
            "--train.progress", "false", "--train.tensorboard", "false", "--train.device", "cpu",
            "--runs_dir", str(tmp_path), "--name", "run"]
    src = str(Path(__file__).resolve().parents[1] / "src")
    k = random.Random().randint(16, steps - 1)  # the random step, reported on failure

    def run(plan, *extra):
        env = dict(os.environ, KILL_PLAN=plan, PYTHONPATH=src)
        return subprocess.run(argv + list(extra), env=env, capture_output=True, text=True, timeout=600)

    ckpts = tmp_path / "run" / "checkpoints"
    # 1. killed while writing its first checkpoint (step 5): a half-written temporary, no checkpoint
    p = run("save:1:weights")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [c.name for c in ckpts.iterdir()][0].startswith(".step-5.") and not step_checkpoints(tmp_path / "run")
    # 2. --resume latest: nothing complete yet, so it starts again from step 0 (and cleans up); killed at the
    #    third save (step 15) after every file but the marker was written
    p = run("save:3:marker", "--resume", "latest")
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "starting it from step 0" in p.stdout and ".step-5." in p.stdout  # the temporary was removed
    assert [c.name for c in step_checkpoints(tmp_path / "run")] == ["step-5", "step-10"]
    # 3. resumes from step 10; killed at a random later step
    p = run(f"step:{k}", "--resume", "latest")
    assert p.returncode == -signal.SIGKILL, (k, p.stderr)
    # 4. resumes from the newest complete checkpoint and finishes
    p = run("none", "--resume", "latest")
    assert p.returncode == 0, (k, p.stderr)
    assert not [c for c in ckpts.iterdir() if c.name.startswith(".")]
    rows = {n: [(r["step"], r["split"], r.get("loss")) for r in read_metrics(tmp_path / n / "metrics.jsonl")]
            for n in ("ref", "run")}
    assert rows["run"] == rows["ref"], f"killed at step {k}"
    assert len([r for r in rows["ref"] if r[1] == "train"]) == steps


@pytest.mark.parametrize("extra,message", [
    (["--max_steps", "0"], "max_steps must be at least 1, got 0"),
    (["--vocab_size", "10"], "vocab_size: a byte-level BPE needs at least 257"),
    (["--device", "foo"], "device: 'foo' is not a device"),
    (["--max_mb", "-1"], "max_mb must be > 0, got -1.0"),
    (["--seq_len", "0"], "data.seq_len must be at least 1, got 0"),
    (["--corpus", "nowhere.txt"], "nowhere.txt: no such file or folder"),
])
def test_quickstart_bad_values_fail_before_anything_is_made(tmp_path, capsys, extra, message):
    assert message in error_line(capsys, ["quickstart", "--runs_dir", tmp_path / "runs", *extra])
    assert not (tmp_path / "runs").exists()


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    import errno

    import lmforge.storage as storage

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    (tmp_path / "in.txt").write_text("one\n\ntwo\n")
    monkeypatch.setattr(storage, "_fsync", full)
    line = error_line(capsys, ["clean", tmp_path / "in.txt", "--out", tmp_path / "out.txt"])
    assert line.startswith("lmforge clean: error: ") and line.endswith("No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_readme_troubleshooting_rows_are_tested():
    """Each row of the README's troubleshooting table names a test here whose source holds the row's
    message (placeholders such as OUT or N aside)."""
    import difflib
    import inspect
    import re
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `") or ln.startswith("| the ") or ln.startswith("| any ")]
    assert len(rows) >= 20
    module = sys.modules[__name__]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        message, test = re.search(r"`(.+)`", cells[1]).group(1), cells[2].strip("`")
        owner = module
        if "::" in test:  # a test in another file: tests/FILE.py::name
            import importlib

            filename, test = test.split("::")
            owner = importlib.import_module(Path(filename).stem)
        assert hasattr(owner, test), f"README row names a missing test: {test}"
        source = inspect.getsource(getattr(owner, test))
        pieces = [p for p in re.split(r"\b[A-Z]{1,5}\b|\(\.\.\.\)|\.\.\.", message) if p.strip()]
        best = max(difflib.SequenceMatcher(None, p, source, autojunk=False).find_longest_match(0, len(p), 0, len(source)).size
                   for p in pieces)
        assert best >= min(20, max(map(len, pieces))), f"{test} does not check the README's message {message!r}"
