"""Recorded losses, one per objective: a few steps of a tiny model with a fixed seed give exactly the
losses recorded here (as torchtitan's loss comparison and torchtune's recipe tests do). A refactor
that should not change the math (data, masking, model, loss, optimizer, schedule, dropout seeding)
must leave them as they are; one that changes the math fails here and must say so when it re-records.

The corpus and tokenizer are built here, deterministically (seeded sentences; a character
tokenizer with BERT's special tokens, so no tokenizer training is involved). Re-record with
`python tests/test_recorded_loss.py` and paste its output into RECORDED, with the reason in the commit.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmforge.data.prepare import prepare
from lmforge.recipes.pretrain import DataConfig, pretrain
from lmforge.text.tokenizer import build_char
from lmforge.train.config import TrainConfig
from lmforge.train.trainer import read_metrics

BERT = {"n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64}
CASES = {
    "clm": dict(arch="gpt", objective="clm", model={"n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.1}),
    "mlm": dict(arch="bert", objective="mlm", model=BERT),
    "mlm+nsp": dict(arch="bert", objective="mlm+nsp", model=BERT),
    "simcse": dict(arch="bert", objective="simcse", model=BERT),
    "lstm-clm": dict(arch="lstm", objective="clm", model={"n_layer": 2, "d_model": 32, "d_hidden": 64, "dropout": 0.1}),
}

# objective -> (train loss at steps 1..5, validation loss after step 5); recorded on CPU, fp32, one thread
RECORDED = {
    "clm": ([3.7971673011779785, 3.728050470352173, 3.6146719455718994, 3.5722756385803223, 3.554537057876587],
            3.5113747119903564),
    "mlm": ([3.832423686981201, 3.780447006225586, 3.6752641201019287, 3.701474905014038, 3.7780160903930664],
            3.6737446784973145),
    "mlm+nsp": ([4.473454475402832, 4.444163799285889, 4.465182304382324, 4.386746406555176, 4.426590919494629],
                4.263620376586914),
    "simcse": ([1.7991244792938232, 1.5261069536209106, 1.4753302335739136, 1.6256037950515747, 1.5309267044067383],
               1.386258602142334),
    "lstm-clm": ([3.7821691036224365, 3.7723960876464844, 3.7538135051727295, 3.743680238723755, 3.7350637912750244],
                 3.723320245742798),
}
# Float noise between machines (BLAS kernels) stays far below this; a change of the math does not.
RTOL = 2e-5


def make_data(d: Path) -> Path:
    """A seeded corpus of short sentences, a char tokenizer with [PAD] [UNK] [CLS] [SEP] [MASK], and shards
    with sentence offsets (for mlm+nsp and simcse)."""
    rng = random.Random(0)
    words = "the a cat dog fox sees chases likes small big red quick lazy runs sleeps home park".split()
    docs = []
    for _ in range(40):
        sents = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))).capitalize() + rng.choice(".!?")
                 for _ in range(rng.randint(2, 5))]
        docs.append(" ".join(sents))
    (d / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    build_char(sorted(set("".join(docs))), ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]).save(d / "tok.json")
    prepare([str(d / "corpus.txt")], str(d / "prep"), str(d / "tok.json"), sentences=True, workers=1)
    return d / "prep"


def losses(prep: Path, runs: Path, name: str, **changes) -> tuple[list[float], float]:
    """Train CASES[name] (with `changes` to its pretrain arguments) for 5 steps; (train loss per step,
    final validation loss)."""
    train = TrainConfig(max_steps=5, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0, eval_batches=2,
                        log_every=1, progress=False, tensorboard=False, device="cpu", seed=11)
    run = name.replace("+", "-")
    pretrain(data=DataConfig(path=str(prep), seq_len=32), train=train, runs_dir=str(runs), name=run,
             **{**CASES[name], **changes})
    rows = read_metrics(runs / run / "metrics.jsonl")
    return [r["loss"] for r in rows if r["split"] == "train"], [r["loss"] for r in rows if r["split"] == "val"][-1]


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("recorded"))


@pytest.mark.parametrize("name", list(CASES))
def test_recorded_losses(prep, tmp_path, name, capsys):
    train, val = losses(prep, tmp_path, name)
    want_train, want_val = RECORDED[name]
    assert train == pytest.approx(want_train, rel=RTOL), f"{name}: train losses changed: {train}"
    assert val == pytest.approx(want_val, rel=RTOL), f"{name}: validation loss changed: {val}"


def test_a_changed_objective_is_caught(prep, tmp_path):
    """The guard works: masking 16% of tokens instead of 15% changes the recorded mlm losses."""
    train, _ = losses(prep, tmp_path, "mlm", objective_args={"mask_prob": 0.16})
    assert train != pytest.approx(RECORDED["mlm"][0], rel=RTOL)


if __name__ == "__main__":  # re-record: prints RECORDED's entries
    import sys
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp))
        out = {name: losses(data, Path(tmp) / "runs", name) for name in CASES}
    for name, (train, val) in out.items():
        print(f"    {name!r}: ({train},\n        {val}),", file=sys.stderr)
