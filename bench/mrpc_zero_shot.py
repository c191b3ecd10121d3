"""MRPC zero-shot from all-MiniLM-L6-v2's own sentence embeddings: the cosine of the two sentences'
mean-pooled vectors, with the threshold that maximises F1 on train.tsv, scored on dev.tsv. The floor that
fine-tuning a cross-encoder (`lmforge finetune --task pair --init_from minilm-l6`) should beat.

    python bench/mrpc_zero_shot.py
"""
import csv
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from lmforge.interop.minilm import minilm_dir

MRPC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mrpc"


def read(path: Path):
    rows = list(csv.reader(path.open(encoding="utf-8-sig"), delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    a, b, q = head.index("#1 String"), head.index("#2 String"), head.index("Quality")
    return [r[a] for r in rows[1:]], [r[b] for r in rows[1:]], np.array([int(r[q]) for r in rows[1:]])


@torch.no_grad()
def embed(tok, model, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), 64):
        enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def f1_acc(scores, labels, threshold: float) -> tuple[float, float]:
    pred = scores >= threshold
    tp = (pred & (labels == 1)).sum()
    return float(2 * tp / (pred.sum() + (labels == 1).sum())), float((pred == (labels == 1)).mean())


def main() -> None:
    if not MRPC.is_dir():
        raise SystemExit(f"{MRPC}: not found (the shared data sets live in ../shared/data)")
    torch.set_num_threads(1)
    base = minilm_dir()
    tok, model = AutoTokenizer.from_pretrained(base), AutoModel.from_pretrained(base).eval()
    scored = {}
    for split in ("train.tsv", "dev.tsv"):
        a, b, y = read(MRPC / split)
        scored[split] = ((embed(tok, model, a) * embed(tok, model, b)).sum(-1).numpy(), y)
    s, y = scored["train.tsv"]
    best = max(np.arange(0.30, 1.0, 0.01), key=lambda t: f1_acc(s, y, t)[0])
    f1, acc = f1_acc(*scored["dev.tsv"], best)
    print(f"threshold {best:.2f} (best F1 on train): dev F1 {100 * f1:.2f}, accuracy {100 * acc:.2f}")


if __name__ == "__main__":
    main()
