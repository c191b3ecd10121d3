"""`lmforge pretrain` under torchrun: two CPU processes (gloo) train one model with DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pretrain_under_torchrun_two_processes(tmp_path):
    """The real launcher: `torchrun --nproc_per_node 2 -m lmforge pretrain` with FSDP2 and batch 4 logs the
    losses of `lmforge pretrain` with batch 8 (within 1e-5 at every step)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i} of a small test corpus about foxes and dogs" for i in range(80)))
    lm = [sys.executable, "-m", "lmforge"]
    subprocess.run(lm + ["tokenizer", str(corpus), "--kind", "char", "--out", str(tmp_path / "t.json")], check=True, env=env)
    subprocess.run(lm + ["prepare", str(corpus), "--tokenizer", str(tmp_path / "t.json"), "--out", str(tmp_path / "p")],
                   check=True, env=env)
    args = ["pretrain", "--data.path", str(tmp_path / "p"), "--data.seq_len", "32", "--model.n_layer", "1",
            "--model.n_head", "2", "--model.d_model", "32", "--train.max_steps", "6", "--train.log_every", "1",
            "--train.eval_every", "3", "--train.progress", "false", "--train.tensorboard", "false",
            "--train.threads", "1", "--runs_dir", str(tmp_path / "runs")]
    subprocess.run(lm + args + ["--train.batch_size", "8", "--name", "one"], check=True, env=env, capture_output=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "lmforge"] + args + ["--train.batch_size", "4", "--train.parallel", "fsdp", "--name", "fsdp"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "fsdp"
    assert (run / "checkpoints" / "step-6" / "model.safetensors").is_file()
    got, want = _metrics(run), _metrics(tmp_path / "runs" / "one")
    assert got.keys() == want.keys() and [s for s, split in got if split == "val"] == [3, 6]
    for key, row in want.items():
        assert abs(got[key]["loss"] - row["loss"]) <= TOL, key


# ---- DDP without a static graph: each objective trains only the heads it runs --------------------------
BERT = {"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32, "max_position": 16}
OBJECTIVES = ("mlm", "mlm+nsp", "simcse")


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    """One of two gloo processes: the pretrain recipe for each objective, then a control run that wraps a
    model whose heads are not frozen (which DDP without a static graph must refuse)."""
    import torch

    from lmforge.models import build_model
    from lmforge.recipes.pretrain import DataConfig, pretrain
    from lmforge.train.config import TrainConfig
    from lmforge.train.distributed import apply_ddp
    from lmforge.train.simcse import SimCSEObjective

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LMFORGE_KEEP_PG="1")
    torch.set_num_threads(1)
    report = {}
    for objective in OBJECTIVES:
        cfg = TrainConfig(max_steps=3, batch_size=4, warmup_steps=0, eval_every=0, eval_batches=1, log_every=1,
                          tensorboard=False, progress=False, device="cpu", seed=5)
        out = pretrain(DataConfig(path=str(Path(tmp) / "data"), seq_len=16), arch="bert", model=dict(BERT),
                       objective=objective, train=cfg, name=objective.replace("+", "-"), runs_dir=str(Path(tmp) / "runs"))
        report[objective] = out["step"]
    import torch.distributed as dist

    torch.manual_seed(0)
    plain = apply_ddp(build_model("bert", dict(BERT, vocab_size=64)), torch.device("cpu"))
    ids = torch.randint(5, 64, (4, 8))
    try:
        for _ in range(2):  # the second step finds the pooler's and heads' gradients still missing
            SimCSEObjective().loss(plain, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0].backward()
        report["control"] = "ran"
    except RuntimeError as e:
        report["control"] = str(e).splitlines()[0]
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # as the recipes end (end_distributed): nobody tears down while another works
    dist.destroy_process_group()


def test_ddp_without_static_graph_trains_each_objective(tmp_path):
    """mlm, mlm+nsp and simcse under two gloo processes, DDP without static_graph: the runs complete, and
    each one trains exactly the heads its objective runs (the others keep their initial weights)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    from lmforge.data.prepare import prepare
    from lmforge.models import build_model
    from lmforge.storage import load_tensors
    from lmforge.text.tokenizer import Tokenizer, train_tokenizer

    words = "the a fox dog runs sleeps under over red old tree river sees small".split()
    rng = __import__("random").Random(0)
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(4))
            for _ in range(40)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    train_tokenizer(docs, kind="wordpiece", vocab_size=64).save(tmp_path / "tok.json")
    prepare([str(tmp_path / "c.txt")], str(tmp_path / "data"), str(tmp_path / "tok.json"), sentences=True,
            val_fraction=0.2, workers=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert [report[o] for o in OBJECTIVES] == [3, 3, 3]
        assert "finished reduction" in report["control"], report["control"]  # unfrozen unused heads: refused
    torch.manual_seed(5)  # the recipe's model: the same seed, the same initial weights
    init = build_model("bert", dict(BERT, vocab_size=Tokenizer.load(tmp_path / "tok.json").vocab_size)).state_dict()
    heads = {"mlm": "cls.predictions.transform.dense.weight", "pooler": "pooler.dense.weight",
             "nsp": "cls.seq_relationship.weight"}
    trained = {"mlm": {"mlm"}, "mlm+nsp": {"mlm", "pooler", "nsp"}, "simcse": set()}
    for objective in OBJECTIVES:
        final = load_tensors(tmp_path / "runs" / objective.replace("+", "-") / "checkpoints" / "step-3" / "model.safetensors")
        assert not torch.equal(final["encoder.layer.0.output.dense.weight"], init["encoder.layer.0.output.dense.weight"])
        changed = {h for h, key in heads.items() if not torch.equal(final[key], init[key])}
        assert changed == trained[objective], objective


# ---- the same numbers on any number of processes ---------------------------------------------------------
# N processes with train.batch_size B train the run one process trains with N x B: the global batch is drawn
# from (seed, step), each process takes its slice, gradients are averaged, the logged loss is the global mean.
GPT = {"n_layer": 2, "n_head": 2, "d_model": 16}
TOL = 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(tmp: Path) -> Path:
    """A small corpus as prepared shards (wordpiece tokenizer, sentence boundaries) in tmp/data."""
    from lmforge.data.prepare import prepare
    from lmforge.text.tokenizer import train_tokenizer

    words = "the a fox dog runs sleeps under over red old tree river sees small".split()
    rng = __import__("random").Random(0)
    docs = ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(4))
            for _ in range(40)]
    (tmp / "c.txt").write_text("\n\n".join(docs))
    train_tokenizer(docs, kind="wordpiece", vocab_size=64).save(tmp / "tok.json")
    prepare([str(tmp / "c.txt")], str(tmp / "data"), str(tmp / "tok.json"), sentences=True, val_fraction=0.2, workers=1)
    return tmp / "data"


def _gpt_run(tmp: Path, name: str, batch_size: int, parallel: str = "ddp", resume=None, **train):
    """The pretrain recipe on a tiny GPT: 6 steps (checkpoints at 3 and 6), a loss line every step,
    validation over the whole split at 3 and 6, no dropout."""
    from lmforge.recipes.pretrain import DataConfig, pretrain
    from lmforge.train.config import TrainConfig

    values = dict(max_steps=6, batch_size=batch_size, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=3,
                  log_every=1, save_every=3, keep_checkpoints=5, tensorboard=False, progress=False, device="cpu",
                  seed=3, threads=1, parallel=parallel)
    values.update(train)
    return pretrain(DataConfig(path=str(tmp / "data"), seq_len=16), arch="gpt", model=dict(GPT), objective="clm",
                    train=TrainConfig(**values), name=name, runs_dir=str(tmp / "runs"), resume=resume)


def _mlm_run(tmp: Path, name: str, batch_size: int, parallel: str = "ddp"):
    """The pretrain recipe on a tiny BERT with the mlm objective (whose loss is a mean over the masked
    positions, which differ in number between the processes' slices): 6 steps, no dropout."""
    from lmforge.recipes.pretrain import DataConfig, pretrain
    from lmforge.train.config import TrainConfig

    cfg = TrainConfig(max_steps=6, batch_size=batch_size, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_every=3,
                      log_every=1, save_every=3, tensorboard=False, progress=False, device="cpu", seed=3, threads=1,
                      parallel=parallel)
    return pretrain(DataConfig(path=str(tmp / "data"), seq_len=16), arch="bert",
                    model=dict(BERT, dropout=0.0, attn_dropout=0.0), objective="mlm", objective_args={"whole_word": True},
                    train=cfg, name=name,
                    runs_dir=str(tmp / "runs"))


def _classify_data(tmp: Path) -> None:
    """48 training and 16 dev sentences (6 global batches of 8 an epoch, all full) and a tokenizer."""
    from lmforge.text.tokenizer import train_tokenizer

    rng = __import__("random").Random(0)
    good, bad, fill = "good great fine nice".split(), "bad awful poor dull".split(), "the film plot was very quite".split()
    for split, n in (("train", 48), ("dev", 16)):
        rows = []
        for i in range(n):
            label = "pos" if rng.random() < 0.5 else "neg"
            words = rng.sample(fill, rng.randint(1, 5)) + [rng.choice(good if label == "pos" else bad)]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)}\t{label}")
        (tmp / f"{split}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    train_tokenizer([l.split("\t")[0] for l in (tmp / "train.tsv").read_text().splitlines()[1:]], kind="wordpiece",
                    vocab_size=80, min_frequency=1).save(tmp / "cls_tok.json")


def _classify_run(tmp: Path, name: str, batch_size: int, parallel: str = "ddp"):
    """The finetune recipe: a tiny BERT from scratch, 6 steps, the dev set scored at 3 and 6 (best kept).
    No dropout: each process draws the dropout masks of its own rows (from (seed, step)), so with dropout
    the runs are statistically, not numerically, the same."""
    from lmforge.recipes.finetune import finetune
    from lmforge.tasks.base import TaskData
    from lmforge.train.config import TrainConfig

    cfg = TrainConfig(max_steps=6, batch_size=batch_size, lr=3e-3, min_lr=0.0, warmup_steps=0, eval_every=3,
                      log_every=1, tensorboard=False, progress=False, device="cpu", seed=2, threads=1, parallel=parallel)
    return finetune("classify", TaskData(train=str(tmp / "train.tsv"), dev=str(tmp / "dev.tsv"), max_length=16),
                    arch="bert", model=dict(BERT, dropout=0.0, attn_dropout=0.0), task_args={"dropout": 0.0}, tokenizer=str(tmp / "cls_tok.json"), train=cfg,
                    name=name, runs_dir=str(tmp / "runs"), quiet=True)


def _tag_data(tmp: Path) -> None:
    """CoNLL-style files: 48 training and 16 dev sentences of PER/LOC names among filler words."""
    rng = __import__("random").Random(1)
    names = {"PER": ["anna smith", "bo li", "carl", "dana may"], "LOC": ["paris", "new york", "oslo", "la paz"]}
    fill = "we saw met in the at and then went to".split()
    for split, n in (("train", 48), ("dev", 16)):
        sents = []
        for _ in range(n):
            rows = [f"{w} O" for w in rng.sample(fill, rng.randint(1, 4))]
            kind = rng.choice(sorted(names))
            words = rng.choice(names[kind]).split()
            rows += [f"{w} {'B' if i == 0 else 'I'}-{kind}" for i, w in enumerate(words)]
            rows += [f"{w} O" for w in rng.sample(fill, rng.randint(0, 3))]
            sents.append("\n".join(rows))
        (tmp / f"{split}.conll").write_text("\n\n".join(sents) + "\n")


def _tag_run(tmp: Path, name: str, batch_size: int, parallel: str = "ddp"):
    """The finetune recipe for tagging with a CRF head: tiny BERT, 6 steps, dev scored at 3 and 6."""
    from lmforge.recipes.finetune import finetune
    from lmforge.tasks.base import TaskData
    from lmforge.train.config import TrainConfig

    cfg = TrainConfig(max_steps=6, batch_size=batch_size, lr=3e-3, min_lr=0.0, warmup_steps=0, eval_every=3,
                      log_every=1, tensorboard=False, progress=False, device="cpu", seed=2, threads=1, parallel=parallel)
    return finetune("tag", TaskData(train=str(tmp / "train.conll"), dev=str(tmp / "dev.conll"), max_length=16),
                    arch="bert", model=dict(BERT, dropout=0.0, attn_dropout=0.0), task_args={"dropout": 0.0, "crf": True},
                    tokenizer=str(tmp / "cls_tok.json"), train=cfg, name=name, runs_dir=str(tmp / "runs"), quiet=True)


def _seq2seq_data(tmp: Path) -> None:
    """48 training and 8 dev pairs ('translation': upper-case each word) and a BPE tokenizer."""
    from lmforge.text.tokenizer import train_tokenizer

    rng = __import__("random").Random(2)
    words = "the cat dog sat ran on a mat big red".split()
    for split, n in (("train", 48), ("dev", 8)):
        rows = [" ".join(rng.choices(words, k=rng.randint(2, 5))) for _ in range(n)]
        (tmp / f"{split}.pairs.tsv").write_text("".join(f"{r}\t{r.upper()}\n" for r in rows))
    texts = (tmp / "train.pairs.tsv").read_text().replace("\t", "\n").splitlines()
    train_tokenizer(texts, kind="bpe", vocab_size=300, min_frequency=1).save(tmp / "s2s_tok.json")


def _seq2seq_run(tmp: Path, name: str, batch_size: int, parallel: str = "ddp"):
    """The finetune recipe for seq2seq on a tiny GPT (its loss runs the backbone's lm_head on the response
    positions, outside the model's forward): 6 steps, dev scored at 3 and 6."""
    from lmforge.recipes.finetune import finetune
    from lmforge.tasks.base import TaskData
    from lmforge.train.config import TrainConfig

    cfg = TrainConfig(max_steps=6, batch_size=batch_size, lr=3e-3, min_lr=0.0, warmup_steps=0, eval_every=3,
                      log_every=1, tensorboard=False, progress=False, device="cpu", seed=2, threads=1, parallel=parallel)
    return finetune("seq2seq", TaskData(train=str(tmp / "train.pairs.tsv"), dev=str(tmp / "dev.pairs.tsv")),
                    arch="gpt", model=dict(GPT, block_size=32, dropout=0.0), task_args={"max_new_tokens": 4},
                    tokenizer=str(tmp / "s2s_tok.json"), train=cfg, name=name, runs_dir=str(tmp / "runs"), quiet=True)


def _metrics(run: Path) -> dict[tuple[int, str], dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], r["split"]): r for r in rows}


def _assert_same_numbers(run: Path, ref: Path, steps=range(1, 7)) -> None:
    """Every step's train loss and gradient norm, and every validation loss, within TOL of the reference."""
    got, want = _metrics(run), _metrics(ref)
    keys = [(s, "train") for s in steps] + [(s, "val") for s in (3, 6) if s >= min(steps)]
    for key in keys:
        for field in ("loss", "grad_norm") if key[1] == "train" else ("loss",):
            assert abs(got[key][field] - want[key][field]) <= TOL, (run.name, key, field, got[key][field], want[key][field])


def _continue_from(tmp: Path, src: str, name: str, step: int = 3) -> Path:
    """A copy of run `src` as it was at its step-`step` checkpoint (the later checkpoints removed)."""
    import shutil

    runs = tmp / "runs"
    shutil.copytree(runs / src, runs / name)
    for ckpt in (runs / name / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return runs / name


def _same_numbers_worker(rank: int, port: int, tmp: str) -> None:
    """One of two gloo processes: DDP and FSDP2 runs with batch 4 each (global batch 8), and the 1-process
    run's step-3 checkpoint continued under FSDP2."""
    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LMFORGE_KEEP_PG="1")
    torch.set_num_threads(1)
    tmp = Path(tmp)
    _gpt_run(tmp, "ddp", 4, "ddp")
    _gpt_run(tmp, "fsdp", 4, "fsdp")
    _gpt_run(tmp, "one-then-fsdp", 4, "fsdp", resume="latest")
    _classify_run(tmp, "cls-ddp", 4, "ddp")
    _classify_run(tmp, "cls-fsdp", 4, "fsdp")
    _tag_run(tmp, "tag-ddp", 4, "ddp")
    _tag_run(tmp, "tag-fsdp", 4, "fsdp")
    _seq2seq_run(tmp, "s2s-ddp", 4, "ddp")
    _mlm_run(tmp, "mlm-ddp", 4, "ddp")
    import torch.distributed as dist

    dist.barrier()  # as the recipes end (end_distributed): nobody tears down while another works
    dist.destroy_process_group()


def test_two_processes_train_the_one_process_run(tmp_path):
    """2 gloo processes x batch 4 (DDP, and FSDP2) log the losses, gradient norms and validation losses of
    1 process x batch 8 within 1e-5 at every step and end with the same weights; a checkpoint written by 2
    processes (DDP or FSDP2) continues in 1 process to the same losses, and one written by 1 process continues
    under FSDP2; a resume that changes the global batch is refused in one line and touches nothing."""
    import torch
    import torch.multiprocessing as mp

    from lmforge.errors import ConfigError
    from lmforge.storage import load_tensors, read_json, torch_load

    _prepare(tmp_path)
    _classify_data(tmp_path)
    _gpt_run(tmp_path, "one", 8)  # the reference: one process, batch 8
    _classify_run(tmp_path, "cls-one", 8)
    _tag_data(tmp_path)
    _tag_run(tmp_path, "tag-one", 8)
    _seq2seq_data(tmp_path)
    _seq2seq_run(tmp_path, "s2s-one", 8)
    _mlm_run(tmp_path, "mlm-one", 8)
    _continue_from(tmp_path, "one", "one-then-fsdp")
    mp.spawn(_same_numbers_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)

    runs = tmp_path / "runs"
    for name in ("ddp", "fsdp"):
        _assert_same_numbers(runs / name, runs / "one")
        want = load_tensors(runs / "one" / "checkpoints" / "step-6" / "model.safetensors")
        got = load_tensors(runs / name / "checkpoints" / "step-6" / "model.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=TOL, rtol=0)
        state = read_json(runs / name / "checkpoints" / "step-3" / "trainer_state.json")
        assert (state["world_size"], state["batch_size"], state["global_batch"], state["parallel"]) == (2, 4, 8, name)
        # the optimizer state is keyed by parameter name, whatever the layout: the same moments as one process
        ours = torch_load(runs / name / "checkpoints" / "step-3" / "optimizer.pt")
        ref = torch_load(runs / "one" / "checkpoints" / "step-3" / "optimizer.pt")
        assert ours["state"].keys() == ref["state"].keys() == set(want) - {"lm_head.weight"}
        for k, v in ref["state"].items():
            torch.testing.assert_close(ours["state"][k]["exp_avg"], v["exp_avg"], atol=TOL, rtol=0)
    _assert_same_numbers(runs / "one-then-fsdp", runs / "one", steps=range(4, 7))
    # a loss over a varying number of items (masked positions): each process weighs its mean by its share
    _assert_same_numbers(runs / "mlm-ddp", runs / "mlm-one")
    # fine-tuning: the same, dev metrics and the best checkpoint included; tagging trains its CRF and
    # seq2seq its LM head (each task's loss finds them under the DDP/FSDP wrapper) to the one-process numbers
    for name, one in (("cls-ddp", "cls-one"), ("cls-fsdp", "cls-one"), ("tag-ddp", "tag-one"), ("tag-fsdp", "tag-one"),
                      ("s2s-ddp", "s2s-one")):
        got, want = _metrics(runs / name), _metrics(runs / one)
        assert got.keys() == want.keys()
        for key, row in want.items():
            for field in ("loss", "grad_norm", "accuracy", "f1", "bleu"):
                if field in row:
                    assert abs(got[key][field] - row[field]) <= TOL, (name, key, field, got[key][field], row[field])
        best, ref = (load_tensors(runs / n / "best" / "model.safetensors") for n in (name, one))
        for k in ref:
            torch.testing.assert_close(best[k], ref[k], atol=TOL, rtol=0)

    # 2 processes -> 1 process, the same global batch: the same run
    for name in ("ddp", "fsdp"):
        _continue_from(tmp_path, name, f"{name}-then-one")
        _gpt_run(tmp_path, f"{name}-then-one", 8, resume="latest")
        _assert_same_numbers(runs / f"{name}-then-one", runs / "one", steps=range(4, 7))

    # another global batch: refused before anything is written
    changed = _continue_from(tmp_path, "ddp", "changed")
    before = {p: p.read_bytes() for p in changed.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        _gpt_run(tmp_path, "changed", 4, resume="latest")
    msg = str(err.value)
    assert "\n" not in msg and "global batch is 8 sequences (2 process(es) x train.batch_size 4)" in msg, msg
    assert "this run's 4 (1 x 4)" in msg and "use train.batch_size 8" in msg and "allow_resume_mismatch" in msg, msg
    assert {p: p.read_bytes() for p in changed.rglob("*") if p.is_file()} == before
    # ... unless explicitly allowed (then it trains on, a different run)
    _gpt_run(tmp_path, "changed", 4, resume="latest", allow_resume_mismatch=True)
    assert read_json(changed / "checkpoints" / "step-6" / "trainer_state.json")["global_batch"] == 4


# ---- the batchers: a global batch per (seed, step, micro), a slice per process ---------------------------
def _rows(batch) -> list[tuple]:
    """Each row of a batch, every field cut to the row's real length (processes pad their slices to their
    own longest row)."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        row = []
        for k in sorted(batch):
            if k == "mlm_positions":
                continue
            v = batch[k][i]
            mask = "pair_attention_mask" if k.startswith("pair_") else "attention_mask"
            if v.dim() and mask in batch:
                v = v[: int(batch[mask][i].sum())]
            row.append((k, tuple(v.tolist()) if v.dim() else v.item()))
        out.append(tuple(row))
    return out


def _check_positions(batch) -> None:
    if "mlm_positions" in batch:
        flat = batch["labels"].flatten()
        assert batch["mlm_positions"].tolist() == (flat != -100).nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("objective", ["clm", "mlm", "mlm+nsp", "simcse", "rtd"])
def test_each_process_takes_its_slice_of_the_global_batch(tmp_path, objective):
    """For every pretraining batcher, the slices of 3 processes x batch 2 (and 2 x 3), in rank order, are the
    rows (and masks, pairs, labels) of 1 process x batch 6, in training and validation."""
    from lmforge.data.shards import open_prepared
    from lmforge.recipes.pretrain import OBJECTIVES, _objective_builder
    from lmforge.train.protocols import ObjectiveContext

    assert objective in OBJECTIVES
    train, val, tok = open_prepared(_prepare(tmp_path))

    def batcher(batch_size, rank=0, world_size=1):
        ctx = ObjectiveContext(tokenizer=tok, train=train, val=val, seq_len=24, batch_size=batch_size, seed=11,
                               rank=rank, world_size=world_size)
        return _objective_builder(objective)(ctx)[0]

    one = batcher(6)
    for world in (3, 2):
        parts = [batcher(6 // world, r, world) for r in range(world)]
        for step, micro in ((0, 0), (5, 1), (17, 0)):
            slices = [p.train_batch(step, micro) for p in parts]
            for s in slices:
                _check_positions(s)
            assert sum((_rows(s) for s in slices), []) == _rows(one.train_batch(step, micro)), (world, step, micro)
        whole = [r for b in one.val_batches(limit=3) for r in _rows(b)]
        per_rank = [list(p.val_batches(limit=3)) for p in parts]
        assert all(len(b) > 0 for b in per_rank)
        if objective == "clm":  # consecutive windows, dealt out one by one: the same windows
            assert sorted(r for b in per_rank for batch in b for r in _rows(batch)) == sorted(whole)
        else:  # global batch i: the ranks' slices in order
            got = [r for i in range(max(map(len, per_rank))) for b in per_rank if i < len(b) for r in _rows(b[i])]
            assert got == whole, world
    assert one.data_id["train_tokens"] == len(train.tokens) and one.data_id["seq_len"] == 24


def test_task_batcher_slices_the_global_batch():
    """TaskBatcher (fine-tuning): the slices of 2 processes x 3 are the rows of 1 process x 6, epochs and
    accumulation included."""
    from lmforge.data.task_batches import TaskBatcher, collate_tokens

    rng = np.random.default_rng(0)
    feats = [{"input_ids": list(range(1, 2 + int(rng.integers(1, 9)))), "label": i % 3} for i in range(30)]

    def collate(fs):
        return {**collate_tokens(fs, 0), "labels": torch.tensor([f["label"] for f in fs])}

    one = TaskBatcher(feats, collate, batch_size=6, seed=4, grad_accum=2)
    two = [TaskBatcher(feats, collate, batch_size=3, seed=4, grad_accum=2, rank=r, world_size=2) for r in (0, 1)]
    for step, micro in ((0, 0), (0, 1), (2, 1), (7, 0)):
        assert sum((_rows(t.train_batch(step, micro)) for t in two), []) == _rows(one.train_batch(step, micro))


# ---- checkpoints and resume in one process ---------------------------------------------------------------
def test_resume_checks_global_batch_data_and_seed(tmp_path):
    """A checkpoint keyed by position (written before optimizer state was keyed by name) still resumes
    exactly; a resume with other data (sequence length) and another seed is refused in one line naming both."""
    from lmforge.errors import ConfigError
    from lmforge.storage import atomic_write_json, read_json, torch_load, torch_save

    _prepare(tmp_path)
    _gpt_run(tmp_path, "one", 8)
    runs = tmp_path / "runs"
    old = _continue_from(tmp_path, "one", "old") / "checkpoints" / "step-3"
    named = torch_load(old / "optimizer.pt")
    order = [n for g in named["param_groups"] for n in g["params"]]  # optimizer.state_dict() numbers them so
    index = {n: i for i, n in enumerate(order)}
    torch_save({"state": {index[n]: v for n, v in named["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]},
               old / "optimizer.pt")
    marker = read_json(old / "complete.json")
    marker["files"]["optimizer.pt"] = (old / "optimizer.pt").stat().st_size
    atomic_write_json(old / "complete.json", marker)
    _gpt_run(tmp_path, "old", 8, resume="latest")
    got, want = _metrics(runs / "old"), _metrics(runs / "one")
    assert got.keys() == want.keys()
    for key, row in want.items():  # exactly
        assert got[key]["loss"] == row["loss"] and got[key].get("grad_norm") == row.get("grad_norm"), key

    _continue_from(tmp_path, "one", "other")
    from lmforge.recipes.pretrain import DataConfig, pretrain
    from lmforge.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        pretrain(DataConfig(path=str(tmp_path / "data"), seq_len=12), arch="gpt", model=dict(GPT),
                 train=TrainConfig(max_steps=6, batch_size=8, seed=4, device="cpu", progress=False, tensorboard=False),
                 name="other", runs_dir=str(runs), resume="latest")
    msg = str(err.value)
    assert "\n" not in msg and "train.seed was 3, is 4" in msg and "the data differs" in msg and "seq_len 16 -> 12" in msg, msg


def test_parallel_must_be_ddp_or_fsdp():
    from lmforge.errors import ConfigError
    from lmforge.train.config import TrainConfig

    assert TrainConfig(parallel="fsdp").parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.parallel must be 'ddp' or 'fsdp', got 'zero'"):
        TrainConfig(parallel="zero")
