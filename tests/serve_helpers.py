"""Shared by the serving tests: tiny models saved with the checkpoint helpers, a real uvicorn server on a
free loopback port in a thread, and small HTTP helpers (plain sockets, so nothing hides what is sent)."""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import torch

from lmforge.config import to_dict
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.text.tokenizer import train_tokenizer
from lmforge.train.checkpoint import save_checkpoint

TEXT = ["the quick brown fox jumps over the lazy dog. the movie was good and the cat sat on the mat. "
        "hello world, héllo wörld 你好世界。 once upon a time there was a king."] * 40


def make_gpt(out: Path, *, position: str = "learned", block_size: int = 128, seed: int = 0) -> Path:
    """A random 2-layer GPT with a small byte-level BPE tokenizer (eos = <|endoftext|>)."""
    tok = train_tokenizer(TEXT, kind="bpe", vocab_size=300)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=320, block_size=block_size, n_layer=2, n_head=2, d_model=32, position=position))
    save_checkpoint(out, model=model, config={"arch": "gpt", "model": to_dict(model.config)}, tokenizer=tok)
    return out


def make_lstm(out: Path, cell: str = "lstm", seed: int = 0) -> Path:
    """A random 2-layer recurrent LM with the same BPE tokenizer."""
    from lmforge.models.lstm import LSTMConfig, LSTMLM

    tok = train_tokenizer(TEXT, kind="bpe", vocab_size=300)
    torch.manual_seed(seed)
    model = LSTMLM(LSTMConfig(vocab_size=320, d_model=32, d_hidden=48, n_layer=2, dropout=0.0, cell=cell))
    save_checkpoint(out, model=model, config={"arch": "lstm", "model": to_dict(model.config)}, tokenizer=tok)
    return out


def make_bert(out: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT masked LM with a small WordPiece tokenizer."""
    tok = train_tokenizer(TEXT, kind="wordpiece", vocab_size=200)
    torch.manual_seed(seed)
    model = Bert(BertConfig(vocab_size=tok.vocab_size, max_position=64, n_layer=2, n_head=2, d_model=32, d_ff=64))
    save_checkpoint(out, model=model, config={"arch": "bert", "model": to_dict(model.config), "objective": "mlm"},
                    tokenizer=tok)
    return out


class Server:
    """`app` served by uvicorn on 127.0.0.1 (a port the OS picked) in a background thread."""

    def __init__(self, app, grace_s: float = 5.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=grace_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def engine(self, name: str):
        return self.app.state.engines[name]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def request(port: int, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, bytes]:
    """(status, headers, body bytes) of one HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    conn.request(method, path, body=body, headers=dict({"Content-Type": "application/json"}, **(headers or {})))
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, {k.lower(): v for k, v in res.getheaders()}, data


def post(port: int, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    status, _, data = request(port, "POST", path, body, headers)
    return status, json.loads(data) if data else {}


def metric(port: int, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    _, _, data = request(port, "GET", "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in data.decode().splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))).strip(",") == want:
            return float(m.group(3))
    return 0.0


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll until `predicate()` holds (a liveness wait, not a speed check)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- fine-tuned task models (through `lmforge finetune`, a few steps on made-up data) --------------------
TASK_BERT = ["--arch", "bert", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "32",
             "--model.d_ff", "64", "--model.max_position", "64"]
TRAIN = ["--train.batch_size", "16", "--train.lr", "3e-3", "--train.device", "cpu", "--train.progress", "false",
         "--train.tensorboard", "false", "--train.log_every", "10"]


def make_classifier(d: Path, steps: int = 40) -> Path:
    """A sentence classifier (pos / neg by a keyword) fine-tuned from scratch; returns its run directory."""
    import random

    from lmforge.cli import run_verb

    rng = random.Random(0)
    pos, neg, fill = "good great lovely superb".split(), "bad awful poor dull".split(), "the film plot was and it very".split()
    rows = []
    for _ in range(200):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(fill, 4) + [rng.choice(pos if label == "pos" else neg)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{label}")
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:160]) + "\n", encoding="utf-8")
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[160:]) + "\n", encoding="utf-8")
    train_tokenizer([r.split("\t")[0] for r in rows], kind="wordpiece", vocab_size=100, min_frequency=1).save(d / "tok.json")
    run_verb("finetune", ["--task", "classify", "--data.train", str(d / "train.tsv"), "--data.dev", str(d / "dev.tsv"),
                          "--data.text", "sentence", "--data.label", "label", "--data.max_length", "32",
                          "--tokenizer", str(d / "tok.json"), *TASK_BERT, *TRAIN, "--train.max_steps", str(steps),
                          "--train.eval_every", str(steps), "--name", "cls", "--runs_dir", str(d / "runs")])
    return d / "runs" / "cls"


def make_tagger(d: Path, steps: int = 40) -> Path:
    """A PER / LOC tagger (CoNLL words and IOB2 tags) fine-tuned from scratch; returns its run directory."""
    import random

    from lmforge.cli import run_verb

    rng = random.Random(1)
    first, places, other = ["alice", "bob", "carol"], ["paris", "rome", "oslo"], "met in at went to saw with the".split()

    def sentence():
        out = []
        for _ in range(rng.randint(3, 7)):
            r = rng.random()
            out.append((rng.choice(first), "B-PER") if r < 0.3 else (rng.choice(places), "B-LOC") if r < 0.5
                       else (rng.choice(other), "O"))
        return "\n".join(f"{w} {t}" for w, t in out)

    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 120), ("dev", 30)):
        (d / f"{split}.txt").write_text("\n\n".join(sentence() for _ in range(n)) + "\n", encoding="utf-8")
    words = [ln.split()[0] for ln in (d / "train.txt").read_text().splitlines() if ln.strip()]
    train_tokenizer([" ".join(words)], kind="wordpiece", vocab_size=80, min_frequency=1).save(d / "tok.json")
    run_verb("finetune", ["--task", "tag", "--data.train", str(d / "train.txt"), "--data.dev", str(d / "dev.txt"),
                          "--tokenizer", str(d / "tok.json"), *TASK_BERT, *TRAIN, "--train.max_steps", str(steps),
                          "--train.eval_every", str(steps), "--name", "ner", "--runs_dir", str(d / "runs")])
    return d / "runs" / "ner"


def make_qa(d: Path, steps: int = 20) -> Path:
    """An extractive QA model (SQuAD v1.1 files: "where did NAME go ?" -> the place) fine-tuned from scratch."""
    import json
    import random

    from lmforge.cli import run_verb

    rng = random.Random(0)
    rows = []
    for _ in range(120):
        name, place = rng.choice(["alice", "bob", "carol"]), rng.choice(["paris", "rome", "oslo"])
        rows.append((f"{name} went to {place} yesterday .", f"where did {name} go ?", place))

    def squad(path: Path, part: list) -> None:
        data = [{"title": "t", "paragraphs": [{"context": c, "qas": [
            {"id": str(i), "question": q, "answers": [{"text": a, "answer_start": c.index(a)}]}]}]}
            for i, (c, q, a) in enumerate(part)]
        path.write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")

    d.mkdir(parents=True, exist_ok=True)
    squad(d / "train.json", rows[:100])
    squad(d / "dev.json", rows[100:])
    train_tokenizer([" ".join(r[:2]) for r in rows], kind="wordpiece", vocab_size=60, min_frequency=1).save(d / "tok.json")
    run_verb("finetune", ["--task", "qa", "--data.train", str(d / "train.json"), "--data.dev", str(d / "dev.json"),
                          "--tokenizer", str(d / "tok.json"), *TASK_BERT, *TRAIN, "--train.max_steps", str(steps),
                          "--train.eval_every", str(steps), "--name", "qa", "--runs_dir", str(d / "runs")])
    return d / "runs" / "qa"
