"""The rtd objective (masked LM + replaced-token detection, lmforge.train.rtd): its loss against a
brute-force reference, exact resume, recorded losses, and its one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.models.bert import Bert, BertConfig
from lmforge.recipes.pretrain import DataConfig, pretrain
from lmforge.train.config import TrainConfig
from lmforge.train.mlm import MLMObjective
from lmforge.train.protocols import ObjectiveContext
from lmforge.train.rtd import build
from lmforge.train.trainer import read_metrics
from test_recorded_loss import BERT, RTOL, make_data

# (train loss at steps 1..5, validation loss, validation mlm_acc after step 5); CPU, fp32, one thread
RECORDED = ([37.88425064086914, 37.093048095703125, 34.74114227294922, 33.24976348876953, 33.35601806640625],
            32.44203186035156, 0.12631578743457794)


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("rtd"))


def train_cfg(**changes) -> TrainConfig:
    base = dict(max_steps=5, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0, eval_batches=2, log_every=1,
                progress=False, tensorboard=False, device="cpu", seed=11)
    return TrainConfig(**{**base, **changes})


def run(prep, runs, name, train, **kw):
    return pretrain(data=DataConfig(path=str(prep), seq_len=32), arch="bert", model=dict(BERT, dropout=0.1),
                    objective="rtd", train=train, runs_dir=str(runs), name=name, **kw)


def setup(prep, **options):
    from lmforge.data.shards import open_prepared

    train, val, tok = open_prepared(prep)
    ctx = ObjectiveContext(tokenizer=tok, train=train, val=val, seq_len=32, batch_size=4, seed=3, options=options)
    batcher, obj = build(ctx)
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=tok.vocab_size, max_position=32, **BERT, dropout=0.0, attn_dropout=0.0))
    return batcher, obj, model.use_heads(*obj.heads), tok


def test_loss_equals_a_brute_force_reference(prep):
    batcher, obj, model, tok = setup(prep, rtd_weight=7.0)
    batch = batcher.train_batch(0, 0)
    torch.manual_seed(5)
    loss, m = obj.loss(model, batch)

    # reference: the same sampling (same seed), the full MLM head over every position, the loss by hand
    torch.manual_seed(5)
    masked = model(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    all_logits = model.mlm_logits(masked.last_hidden_state)  # (B, T, V)
    chosen = batch["labels"] != -100
    mlm = F.cross_entropy(all_logits[chosen], batch["labels"][chosen])
    samples = torch.multinomial(torch.softmax(all_logits[chosen], -1), 1).squeeze(1)
    original = batch["input_ids"].clone()
    original[chosen] = batch["labels"][chosen]
    corrupted = original.clone()
    corrupted[chosen] = samples
    hidden = model(corrupted, attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).last_hidden_state
    token_logit = model.mlm_logits(hidden).gather(-1, corrupted[..., None]).squeeze(-1)  # the head's score of x_i
    special = torch.tensor(sorted(tok.special_ids))
    judged = batch["attention_mask"].bool() & ~torch.isin(corrupted, special)
    target = (corrupted == original)[judged].float()
    rtd = F.binary_cross_entropy_with_logits(token_logit[judged], target)
    torch.testing.assert_close(m["mlm_loss"], mlm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["rtd_loss"], rtd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, mlm + 7.0 * rtd, rtol=1e-5, atol=1e-5)
    assert 0 < m["replaced"] < 0.3  # only chosen positions (15%) can be replaced
    # the masked-LM part is the mlm objective's, exactly
    torch.testing.assert_close(m["mlm_acc"], MLMObjective().loss(model, batch)[1]["mlm_acc"])


def test_replacements_are_fixed_in_eval_and_seeded_in_training(prep):
    batcher, obj, model, _ = setup(prep)
    batch = next(iter(batcher.val_batches()))
    model.eval()
    with torch.no_grad():
        a = obj.loss(model, batch)
        torch.manual_seed(123)
        b = obj.loss(model, batch)
    assert torch.equal(a[0], b[0])  # validation does not depend on the global RNG
    model.train()
    torch.manual_seed(1)
    c = obj.loss(model, batch)[0]
    torch.manual_seed(1)
    d = obj.loss(model, batch)[0]
    torch.manual_seed(2)
    e = obj.loss(model, batch)[0]
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_recorded_losses(prep, tmp_path):
    run(prep, tmp_path, "rec", train_cfg())
    rows = read_metrics(tmp_path / "rec" / "metrics.jsonl")
    train = [r["loss"] for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert train == pytest.approx(RECORDED[0], rel=RTOL), f"train losses changed: {train}"
    assert val["loss"] == pytest.approx(RECORDED[1], rel=RTOL), f"validation loss changed: {val['loss']}"
    assert val["mlm_acc"] == pytest.approx(RECORDED[2], rel=RTOL)
    assert {"mlm_loss", "mlm_acc", "rtd_loss", "rtd_acc", "replaced"} <= set(val) and "ppl" not in val


def test_resume_is_exact(prep, tmp_path, monkeypatch):
    cfg = train_cfg(max_steps=8, save_every=4, eval_every=4)
    run(prep, tmp_path, "full", cfg)
    from lmforge.data.mlm import MLMBatcher

    real = MLMBatcher.train_batch

    def dies_at_step_6(self, step, micro):
        if step == 6:
            raise KeyboardInterrupt
        return real(self, step, micro)

    monkeypatch.setattr(MLMBatcher, "train_batch", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        run(prep, tmp_path, "part", cfg)
    monkeypatch.setattr(MLMBatcher, "train_batch", real)
    run(prep, tmp_path, "part", cfg, resume="latest")

    def rows(name):
        out = {}
        for r in read_metrics(tmp_path / name / "metrics.jsonl"):
            r = {k: v for k, v in r.items() if k not in ("tokens_per_s", "train_s")}
            out[(r["step"], r["split"])] = r
        return out

    a, b = rows("full"), rows("part")
    assert a.keys() == b.keys() and (8, "val") in a and (4, "val") in a
    for key in a:
        assert a[key] == b[key], f"{key}: {json.dumps(a[key])} != {json.dumps(b[key])}"
    from lmforge.storage import load_tensors

    wa = load_tensors(tmp_path / "full" / "checkpoints" / "step-8" / "model.safetensors")
    wb = load_tensors(tmp_path / "part" / "checkpoints" / "step-8" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_is_a_plain_bert(prep, tmp_path):
    from lmforge.checkpoints import load_model

    run(prep, tmp_path, "plain", train_cfg(max_steps=2))
    model, _, cfg = load_model(tmp_path / "plain")
    assert isinstance(model, Bert) and cfg["objective"] == "rtd"


@pytest.mark.parametrize("options, message", [
    ({"rtd_weight": -1}, "objective_args.rtd_weight must be >= 0, got -1"),
    ({"temperature": 0}, "objective_args.temperature must be > 0, got 0"),
    ({"rtd_wieght": 1}, "rtd_weight"),
    ({"mask_prob": 1.5}, "objective_args.mask_prob must be in"),
])
def test_bad_options_are_one_line_errors(prep, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        run(prep, tmp_path, "bad", train_cfg(), objective_args=options)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()


def test_needs_an_encoder_with_an_mlm_head(prep, tmp_path):
    with pytest.raises(ConfigError, match="head 'mlm'") as e:  # the recipe's check, as for mlm
        pretrain(data=DataConfig(path=str(prep), seq_len=32), arch="gpt", model={"n_layer": 1, "n_head": 2, "d_model": 16},
                 objective="rtd", train=train_cfg(), runs_dir=str(tmp_path), name="gpt")
    assert "\n" not in str(e.value) and not (tmp_path / "gpt").exists()
    batcher, obj, _, _ = setup(prep)
    from lmforge.models.gpt import GPT, GPTConfig

    with pytest.raises(ConfigError, match="objective rtd needs an encoder with an MLM head"):
        obj.loss(GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, block_size=32)), batcher.train_batch(0, 0))


if __name__ == "__main__":  # re-record: prints RECORDED
    import sys
    import tempfile
    from pathlib import Path

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        run(data, Path(tmp) / "runs", "rec", train_cfg())
        rows = read_metrics(Path(tmp) / "runs" / "rec" / "metrics.jsonl")
        val = [r for r in rows if r["split"] == "val"][-1]
        print(f"RECORDED = ({[r['loss'] for r in rows if r['split'] == 'train']},\n            "
              f"{val['loss']}, {val['mlm_acc']})", file=sys.stderr)
