"""The trainer's evaluator seam: dev metrics every evaluation, the best checkpoint by a named metric,
early stopping (patience, min delta) and exact resume of that state; layer-wise learning-rate decay."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.train.checkpoint import load_model_state, step_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import Trainer, build_optimizer, layer_depths

from test_trainer import TinyLM, base_cfg, losses, make_trainer


def scripted(values):
    """An evaluator that returns the given dev scores in order (and records the steps it saw)."""
    calls = []

    def evaluator(model):
        calls.append(len(calls))
        return {"score": values[min(len(calls) - 1, len(values) - 1)]}

    return evaluator, calls


def trainer_with(tmp_path, cfg, evaluator, name="run"):
    t = make_trainer(tmp_path, cfg, name)
    t.evaluator = evaluator
    return t


def dev_rows(run_dir):
    """Validation rows without their timing (`train_s`: seconds of training so far, the only clock field)."""
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    assert all(r["train_s"] >= 0 for r in rows)
    return [{k: v for k, v in r.items() if k != "train_s"} for r in rows]


def test_best_checkpoint_follows_the_named_metric(tmp_path):
    cfg = base_cfg(max_steps=20, eval_every=5, best_metric="score", keep_checkpoints=1)
    ev, _ = scripted([0.5, 0.9, 0.7, 0.8])  # evaluations at steps 5, 10, 15, 20: best at step 10
    t = trainer_with(tmp_path, cfg, ev)
    result = t.fit()
    best = tmp_path / "run" / "best"
    state = json.loads((best / "trainer_state.json").read_text())
    assert state["best"]["value"] == 0.9 and state["best"]["step"] == 10
    assert result.best_checkpoint == best
    # the saved best weights differ from the final ones (training went on after step 10)
    final = TinyLM()
    load_model_state(final, step_checkpoints(tmp_path / "run")[-1])
    at_best = TinyLM()
    load_model_state(at_best, best)
    assert not torch.equal(final.head.weight, at_best.head.weight)
    rows = dev_rows(tmp_path / "run")
    assert [r["score"] for r in rows] == [0.5, 0.9, 0.7, 0.8]
    assert [r["best_score"] for r in rows] == [0.5, 0.9, 0.9, 0.9]


def test_early_stopping_with_patience_and_min_delta(tmp_path):
    # improvements of 0.005 do not count with min_delta 0.01: two evaluations without improvement stop the run
    cfg = base_cfg(max_steps=50, eval_every=5, best_metric="score", patience=2, min_delta=0.01)
    ev, calls = scripted([0.5, 0.505, 0.509, 0.9])
    result = trainer_with(tmp_path, cfg, ev).fit()
    assert result.step == 15 and len(calls) == 3
    assert step_checkpoints(tmp_path / "run")[-1].name == "step-15"
    assert max(losses(tmp_path / "run")) == 15  # no training step after the stop


def test_min_mode_for_losses(tmp_path):
    cfg = base_cfg(max_steps=15, eval_every=5, best_metric="dev_loss", patience=1)
    values = iter([1.0, 0.8, 0.9])
    t = make_trainer(tmp_path, cfg)
    t.evaluator = lambda model: {"dev_loss": next(values)}
    assert t.best_mode == "min"
    result = t.fit()
    assert result.step == 15 and t.best["value"] == 0.8 and t.best["step"] == 10


def test_resume_keeps_the_best_and_the_patience_count(tmp_path):
    scores = [0.5, 0.9, 0.7, 0.6, 0.95, 0.4]  # evaluations at steps 5 .. 30
    cfg = base_cfg(max_steps=30, eval_every=5, best_metric="score", patience=3, save_every=15)

    def evaluator_from(offset, crash_at=None):
        calls = []

        def ev(model):
            calls.append(1)
            if crash_at is not None and len(calls) == crash_at:
                raise KeyboardInterrupt  # the run dies here, after its step-15 checkpoint
            return {"score": scores[offset + len(calls) - 1]}
        return ev

    full = trainer_with(tmp_path, cfg, evaluator_from(0), "full")
    full_result = full.fit()
    with pytest.raises(KeyboardInterrupt):
        trainer_with(tmp_path, cfg, evaluator_from(0, crash_at=3), "cut").fit()
    resumed = trainer_with(tmp_path, cfg, evaluator_from(2), "cut")
    result = resumed.fit(resume=tmp_path / "cut")
    assert result.step == full_result.step == 30
    assert resumed.best == full.best == {"value": 0.95, "step": 25, "bad_evals": 1}
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert dev_rows(tmp_path / "cut") == dev_rows(tmp_path / "full")


def test_unknown_best_metric_names_the_dev_metrics(tmp_path):
    cfg = base_cfg(max_steps=5, eval_every=5, best_metric="acc")
    t = trainer_with(tmp_path, cfg, lambda m: {"accuracy": 1.0})
    with pytest.raises(ConfigError, match="train.best_metric 'acc' is not a dev metric; dev metrics: .*accuracy"):
        t.fit()


@pytest.mark.parametrize("kw, msg", [
    (dict(patience=2), "train.patience needs train.best_metric"),
    (dict(patience=-1, best_metric="f1"), "train.patience and train.min_delta must be >= 0"),
    (dict(layer_decay=0.0), r"train.layer_decay must be in \(0, 1\]"),
    (dict(layer_decay=1.5), r"train.layer_decay must be in \(0, 1\]"),
])
def test_bad_early_stopping_and_decay_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)


class Stack(nn.Module):
    """Names like a BERT encoder: embeddings, encoder.layer.i, then a head."""

    def __init__(self, n_layer=3, d=4):
        super().__init__()
        self.embeddings = nn.Embedding(10, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layer))
        self.head = nn.Linear(d, 2)


def test_layer_decay_scales_each_depth():
    model = Stack()
    depths = layer_depths(model)
    assert depths["embeddings.weight"] == 0
    assert depths["encoder.layer.0.weight"] == 1 and depths["encoder.layer.2.bias"] == 3
    assert depths["head.weight"] == 4
    opt = build_optimizer(model, TrainConfig(layer_decay=0.5, device="cpu"), torch.device("cpu"))
    scale = {}
    for g in opt.param_groups:
        for p in g["params"]:
            scale[p] = (g["lr_scale"], g["weight_decay"])
    assert scale[model.head.weight] == (1.0, 0.1) and scale[model.head.bias] == (1.0, 0.0)
    assert scale[model.encoder.layer[2].weight][0] == 0.5
    assert scale[model.encoder.layer[0].weight][0] == 0.125
    assert scale[model.embeddings.weight][0] == 0.0625
    # off: one decayed and one undecayed group, all at the full rate
    plain = build_optimizer(model, TrainConfig(device="cpu"), torch.device("cpu"))
    assert [g["lr_scale"] for g in plain.param_groups] == [1.0, 1.0]


class LayeredLM(Stack):
    def __init__(self):
        super().__init__(n_layer=2, d=8)
        self.embeddings = nn.Embedding(17, 8)
        self.head = nn.Linear(8, 17)

    def forward(self, ids):
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = torch.tanh(layer(x))
        return self.head(x)


def test_layer_decay_applies_in_the_loop(tmp_path):
    from lmforge.data.clm import CLMBatcher
    from lmforge.train.clm import CLMObjective

    from test_trainer import shards

    cfg = base_cfg(max_steps=4, layer_decay=0.5, warmup_steps=0, schedule="constant")
    batcher = CLMBatcher(shards(), shards(600, seed=1), seq_len=16, batch_size=4, seed=cfg.seed)
    t = Trainer(LayeredLM(), CLMObjective(), batcher, cfg, tmp_path / "run", run_config={"arch": "tiny", "model": {}})
    t.fit()
    rates = sorted({g["lr"] for g in t.optimizer.param_groups})
    assert rates == pytest.approx([cfg.lr / 8, cfg.lr / 4, cfg.lr / 2, cfg.lr])
