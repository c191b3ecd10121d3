"""`lmforge pretrain` under torchrun: two CPU processes (gloo) train one model with DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pretrain_under_torchrun_two_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i} of a small test corpus about foxes and dogs" for i in range(80)))
    lm = [sys.executable, "-m", "lmforge"]
    subprocess.run(lm + ["tokenizer", str(corpus), "--kind", "char", "--out", str(tmp_path / "t.json")], check=True, env=env)
    subprocess.run(lm + ["prepare", str(corpus), "--tokenizer", str(tmp_path / "t.json"), "--out", str(tmp_path / "p")],
                   check=True, env=env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "lmforge", "pretrain", "--data.path", str(tmp_path / "p"), "--data.seq_len", "32",
           "--model.n_layer", "1", "--model.n_head", "2", "--model.d_model", "32", "--train.max_steps", "6",
           "--train.batch_size", "4", "--train.eval_every", "3", "--train.progress", "false", "--train.tensorboard", "false",
           "--runs_dir", str(tmp_path / "runs"), "--name", "ddp"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    assert (run / "checkpoints" / "step-6" / "model.safetensors").is_file()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [3, 6]


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
