"""The training loop: schedule, optimizer groups, accumulation, checkpoints and exact resume."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.data.clm import CLMBatcher
from lmforge.errors import CheckpointError, ConfigError
from lmforge.train.checkpoint import find_checkpoint, step_checkpoints
from lmforge.train.clm import CLMObjective
from lmforge.train.config import TrainConfig
from lmforge.train import trainer as trainer_mod
from lmforge.train.trainer import Trainer, build_optimizer, cpu_has_native_bf16, lr_at


class TinyLM(nn.Module):
    """A small causal model with dropout (so resume must also reproduce the dropout noise)."""

    def __init__(self, vocab=17, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.2)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)  # causal: sees t and t-1
        return self.head(self.norm(self.drop(torch.tanh(self.mix(torch.cat([x, prev], -1))))))


def shards(n=5000, vocab=17, seed=0):
    rng = np.random.default_rng(seed)
    # a learnable sequence: mostly t+1 mod vocab, with noise
    toks = np.cumsum(rng.choice([1, 1, 1, 2], size=n)) % vocab
    return SimpleNamespace(tokens=toks.astype(np.uint16))


def make_trainer(tmp_path, cfg, name="run"):
    torch.manual_seed(cfg.seed)
    model = TinyLM()
    batcher = CLMBatcher(shards(), shards(600, seed=1), seq_len=16, batch_size=4, seed=cfg.seed)
    return Trainer(model, CLMObjective(), batcher, cfg, tmp_path / name, run_config={"arch": "tiny", "model": {}})


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def base_cfg(**kw):
    values = dict(max_steps=12, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=5, log_every=1,
                  save_every=0, tensorboard=False, progress=False, grad_accum=2, seed=7, device="cpu")
    values.update(kw)
    return TrainConfig(**values)


def test_schedule_matches_nanogpt_formula():
    cfg = TrainConfig(max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000)

    def nanogpt(it):  # nanoGPT train.py get_lr, written out independently
        if it < 100:
            return 1e-3 * (it + 1) / (100 + 1)
        if it > 2000:
            return 1e-4
        ratio = (it - 100) / (2000 - 100)
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    for it in [0, 1, 50, 99, 100, 101, 500, 1000, 1999]:
        assert lr_at(it, cfg) == pytest.approx(nanogpt(it), rel=1e-12)
    assert lr_at(2000, cfg) == pytest.approx(1e-4)
    lin = TrainConfig(max_steps=10, lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert [round(lr_at(s, lin), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_weight_decay_only_on_matrices():
    model = TinyLM()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_grad_accumulation_equals_big_batch(tmp_path):
    """2 micro-batches of 4 give the same gradient as their concatenation (mean loss)."""
    cfg = base_cfg(grad_accum=2, grad_clip=0.0)
    tr = make_trainer(tmp_path, cfg)
    a, b = tr.batcher.train_batch(0, 0), tr.batcher.train_batch(0, 1)
    ref = TinyLM()
    ref.load_state_dict(tr.model.state_dict())
    ref.eval(), tr.model.eval()  # no dropout, so the two computations see the same function
    ids = torch.cat([a["input_ids"], b["input_ids"]])
    labels = torch.cat([a["labels"], b["labels"]])
    nn.functional.cross_entropy(ref(ids).flatten(0, 1), labels.flatten()).backward()
    tr.optimizer.step = lambda: None  # keep the gradients the trainer's step accumulated
    tr.optimizer.zero_grad = lambda set_to_none=True: None
    tr._train_step(0)
    for (n, p), q in zip(tr.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    full = make_trainer(tmp_path, base_cfg(), "full")
    full.fit()
    # Interrupted run: killed in step 7, after its step-6 checkpoint; then resumed.
    part = make_trainer(tmp_path, base_cfg(save_every=6), "part")
    real = part.batcher.train_batch

    def dies_at_step_7(step, micro):
        if step == 7:
            raise KeyboardInterrupt
        return real(step, micro)

    part.batcher.train_batch = dies_at_step_7
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    assert max(losses(tmp_path / "part")) == 7
    resumed = make_trainer(tmp_path, base_cfg(save_every=6), "part")
    resumed.fit(resume=tmp_path / "part" / "checkpoints" / "step-6")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(7, 13):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
    # Final weights are bit-identical too.
    wa = full.raw_model.state_dict()
    wb = resumed.raw_model.state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_checkpoint_layout_and_pruning(tmp_path):
    tr = make_trainer(tmp_path, base_cfg(max_steps=9, save_every=3, keep_checkpoints=2))
    tr.fit()
    run = tmp_path / "run"
    assert [p.name for p in step_checkpoints(run)] == ["step-6", "step-9"]
    ck = find_checkpoint(run)
    assert ck.name == "step-9"
    for f in ("config.yaml", "model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert (ck / f).is_file(), f
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 9
    assert (run / "loss.png").stat().st_size > 1000
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [5, 9] and all("ppl" in r for r in val)
    assert val[-1]["ppl"] == pytest.approx(math.exp(val[-1]["loss"]))
    # no temporary folders left behind
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_training_reduces_loss(tmp_path):
    tr = make_trainer(tmp_path, base_cfg(max_steps=60, eval_every=0, log_every=10, lr=1e-2))
    first = tr.evaluate()["loss"]
    res = tr.fit()
    assert res.val["loss"] < first - 0.5


def test_native_bf16_detection_agrees_with_proc_cpuinfo():
    """The CPU's own flag list is the reference: native bf16 is AVX512-BF16 or AMX."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system (not Linux)")
    flags = set(next(l for l in text.splitlines() if l.startswith("flags")).split(":", 1)[1].split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_named_once(tmp_path, capsys, monkeypatch, native):
    # which kind of CPU this is cannot be chosen in a test, so the detection is pinned both ways
    monkeypatch.setattr(trainer_mod, "cpu_has_native_bf16", lambda caps=None: native)
    make_trainer(tmp_path, base_cfg(max_steps=2, eval_every=0, precision="bf16")).fit()
    make_trainer(tmp_path, base_cfg(max_steps=2, eval_every=0, precision="fp32"), name="fp32").fit()
    warnings = [l for l in capsys.readouterr().out.splitlines() if "precision bf16" in l]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("warning: train.precision bf16: ")
        assert "no native bf16" in warnings[0] and "--train.precision fp32" in warnings[0]


def test_full_validation_covers_split_once(tmp_path):
    tr = make_trainer(tmp_path, base_cfg())
    batches = list(tr.batcher.val_batches())
    assert sum(b["input_ids"].shape[0] for b in batches) == (600 - 1) // 16
    first = next(iter(tr.batcher.val_batches()))
    assert torch.equal(first["input_ids"], batches[0]["input_ids"])  # same windows every call
    assert len(list(tr.batcher.val_batches(limit=2))) == 2
    # consecutive, non-overlapping windows: window i starts where window i-1's inputs end
    flat = torch.cat([b["input_ids"] for b in batches]).flatten()
    np.testing.assert_array_equal(flat.numpy(), shards(600, seed=1).tokens[: flat.numel()].astype(np.int64))


def test_resume_errors(tmp_path):
    tr = make_trainer(tmp_path, base_cfg())
    with pytest.raises(CheckpointError, match="no such run or checkpoint"):
        tr.fit(resume=tmp_path / "nope")


def test_train_config_errors():
    with pytest.raises(ConfigError, match="train.max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
