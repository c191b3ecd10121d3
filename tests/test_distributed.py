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
