"""`lmforge quickstart`: the whole path on a real corpus that every machine has, in a few minutes.

The default corpus is the source code of the Python standard library that ships with the running
Python (real text written by people, a few MB, no download). The job: train a byte-level BPE
tokenizer on it, write token shards, pretrain a small GPT, report validation loss and perplexity,
and print samples. `--corpus PATH` (a .txt/.jsonl/.gz file or a folder) runs the same on your text.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Optional

# Folders of the standard library left out: tests (huge, repetitive), vendored packages, GUIs, codec tables.
_SKIP = {"test", "tests", "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo", "lib2to3", "encodings", "__pycache__"}


def stdlib_files(max_mb: float) -> list[Path]:
    """The standard library's .py files (sorted, deterministic), up to about `max_mb` MB."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP.intersection(path.relative_to(root).parts[:-1]):
            continue
        size = path.stat().st_size
        if size < 200:
            continue
        files.append(path)
        total += size
        if total >= max_mb * 1e6:
            break
    return files


def _free_name(runs_dir: Path, name: str) -> str:
    if not (runs_dir / name).exists():
        return name
    i = 2
    while (runs_dir / f"{name}-{i}").exists():
        i += 1
    return f"{name}-{i}"


def quickstart(
    corpus: Optional[str] = None,
    runs_dir: str = "runs",
    max_mb: float = 4.0,
    vocab_size: int = 2048,
    max_steps: int = 600,
    seq_len: int = 128,
    device: str = "auto",
    seed: int = 1337,
) -> dict:
    """Train a small GPT end to end (tokenizer, shards, pretraining, samples) with no arguments.

    Args:
        corpus: your own text (file or folder; .txt documents separated by blank lines, .jsonl 'text'
            field, .gz); default: the Python standard library's source files.
        runs_dir: where the run directory (runs/quickstart) is created.
        max_mb: how much of the standard library to use (MB of source).
        vocab_size: BPE vocabulary size.
        max_steps: optimizer steps (batch 16 x seq_len tokens each).
        seq_len: context length.
        device: 'auto', 'cpu' or 'cuda'.
        seed: everything (data order, init, sampling) follows from it.
    """
    from lmforge.data.prepare import prepare
    from lmforge.generation import generate
    from lmforge.recipes.pretrain import DataConfig, pretrain
    from lmforge.text.clean import read_documents
    from lmforge.text.tokenizer import train_tokenizer
    from lmforge.train.checkpoint import load_pretrained
    from lmforge.errors import ConfigError
    from lmforge.train.config import TrainConfig, check_device

    # every value checked before anything is written or trained
    check_device(device, "device")
    train = TrainConfig(max_steps=max_steps, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=max(10, max_steps // 20),
                        eval_every=max(1, max_steps // 4), log_every=10, save_every=0, seed=seed, device=device,
                        weight_decay=0.1, beta2=0.99)
    data = DataConfig(seq_len=seq_len)
    if vocab_size < 257:
        raise ConfigError(f"vocab_size: a byte-level BPE needs at least 257 (256 bytes + end-of-text), got {vocab_size}")
    if not max_mb > 0:
        raise ConfigError(f"max_mb must be > 0, got {max_mb}")
    runs = Path(runs_dir)
    name = _free_name(runs, "quickstart")
    run_dir = runs / name
    if corpus is None:
        files = stdlib_files(max_mb)
        inputs, doc_sep = [str(f) for f in files], "file"
        what = f"Python {sysconfig.get_python_version()} standard library: {len(files)} source files"
    else:
        inputs, doc_sep = [corpus], "blank_line"
        what = corpus
    print(f"[1/4] corpus: {what}", flush=True)

    texts = (text for _, text in read_documents(inputs, doc_sep=doc_sep))
    tokenizer = train_tokenizer(texts, kind="bpe", vocab_size=vocab_size)
    data_dir = run_dir / "data"
    tok_path = tokenizer.save(run_dir / "tokenizer.json")
    print(f"[2/4] tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens -> {tok_path}", flush=True)
    prepare(inputs, str(data_dir), tokenizer=str(tok_path), val_fraction=0.05, split="document", doc_sep=doc_sep, seed=seed)

    print(f"[3/4] pretraining a GPT for {max_steps} steps", flush=True)
    model = {"n_layer": 4, "n_head": 4, "d_model": 128, "block_size": seq_len, "dropout": 0.0, "bias": False}
    summary = pretrain(data=DataConfig(path=str(data_dir), seq_len=data.seq_len), arch="gpt", model=model, objective="clm",
                       train=train, name=name, runs_dir=str(runs))

    print("[4/4] samples (top-k 40, temperature 0.8):", flush=True)
    net, tok, _ = load_pretrained(summary["checkpoint"], device="cpu")
    prompts = ["def ", "class ", "import "]
    ids = [tok.encode(p) for p in prompts]
    outs = generate(net, ids, max_new_tokens=min(60, seq_len - max(map(len, ids))), do_sample=True, temperature=0.8,
                    top_k=40, seed=seed, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    samples = [p + tok.decode(o) for p, o in zip(prompts, outs)]
    for s in samples:
        print("-" * 60 + "\n" + s, flush=True)
    val = summary["val"]
    print("=" * 60)
    print(f"validation loss {val.get('loss', float('nan')):.4f}, perplexity {val.get('ppl', float('nan')):.2f} "
          f"(BPE tokens of held-out files)")
    print(f"checkpoint  {summary['checkpoint']}\ncurves      {run_dir / 'loss.png'}\nmetrics     {run_dir / 'metrics.jsonl'}"
          f"\ntensorboard tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"next: lmforge generate {summary['checkpoint']} --prompt 'def main(' --max_new_tokens 100")
    return {**summary, "samples": samples}
