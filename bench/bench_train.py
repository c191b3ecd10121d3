"""Side-by-side training throughput: lmforge vs Hugging Face transformers on the same shape, data and
batch, in one process, alternating rounds so both see the same machine state.

    python bench/bench_train.py                       # GPT char-level, nanoGPT's CPU config
    python bench/bench_train.py --steps 60 --rounds 3 --append   # and append to bench/RESULTS.md

Work `gpt_char`: 4 layers x 128, 4 heads, block 64, batch 12 on tinyshakespeare characters (from
../shared/data; random tokens of the same vocabulary when it is absent). lmforge runs its real
trainer loop (Trainer._train_step: objective, accumulation, clipping, AdamW); transformers runs the
plain loop people write around GPT2LMHeadModel (sdpa attention, same AdamW groups and clipping).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from common import append_results, machine_line, markdown_table

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def char_tokens() -> tuple[np.ndarray, int, str]:
    if DATA.is_file():
        text = DATA.read_text(encoding="utf-8")
        stoi = {c: i for i, c in enumerate(sorted(set(text)))}
        return np.array([stoi[c] for c in text], dtype=np.uint16), len(stoi), "tinyshakespeare"
    rng = np.random.default_rng(0)
    return rng.integers(0, 65, 1_000_000).astype(np.uint16), 65, "random tokens (../shared absent)"


def lmforge_step_fn(tokens, vocab, args, bias: bool, **model_kw):
    from lmforge.data.clm import CLMBatcher
    from lmforge.models import build_model
    from lmforge.train.clm import CLMObjective
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    torch.manual_seed(0)
    model = build_model("gpt", dict(vocab_size=vocab, block_size=args.block, n_layer=4, n_head=4, d_model=128,
                                    dropout=0.0, bias=bias, **model_kw))
    batcher = CLMBatcher(SimpleNamespace(tokens=tokens), None, seq_len=args.block, batch_size=args.batch, seed=0)
    cfg = TrainConfig(max_steps=10**6, batch_size=args.batch, lr=1e-3, warmup_steps=0, tensorboard=False,
                      progress=False, compile=args.compile)
    trainer = Trainer(model, CLMObjective(), batcher, cfg, "/tmp/lmforge-bench", run_config={})
    state = {"step": 0}

    def step():
        trainer._train_step(state["step"])
        state["step"] += 1

    return step, model


def transformers_step_fn(tokens, vocab, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.data.clm import CLMBatcher

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=args.block, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    batcher = CLMBatcher(SimpleNamespace(tokens=tokens), None, seq_len=args.block, batch_size=args.batch, seed=0)
    state = {"step": 0}

    def step():
        b = batcher.train_batch(state["step"], 0)
        logits = model(input_ids=b["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step, model


def timed(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also torch.compile the lmforge model")
    p.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens, vocab, source = char_tokens()
    contenders = {
        "lmforge, preset shakespeare_char (no bias, exact GELU, rope)":
            lmforge_step_fn(tokens, vocab, args, bias=False, activation="gelu", position="rope"),
        "lmforge, preset shakespeare_char_nanogpt (no bias, exact GELU)":
            lmforge_step_fn(tokens, vocab, args, bias=False, activation="gelu"),
        "lmforge, GPT-2's choices (bias, tanh GELU) = transformers' model":
            lmforge_step_fn(tokens, vocab, args, bias=True),
        "transformers GPT2LMHeadModel": transformers_step_fn(tokens, vocab, args),
    }
    for step, _ in contenders.values():
        timed(step, args.warmup)
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (step, _) in contenders.items():
            times[name].append(timed(step, args.steps))
    tok_per_step = args.batch * args.block
    rates = {name: tok_per_step * args.steps / statistics.median(ts) for name, ts in times.items()}
    ref = rates["transformers GPT2LMHeadModel"]
    lines = [f"GPT char-level ({source}), 4 layers x 128, 4 heads, block {args.block}, batch {args.batch}, "
             f"{args.rounds} rounds x {args.steps} steps, median",
             ""]
    rows = [[name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M", f"{rates[name]:,.0f}",
             f"{rates[name] / ref:.2f}x", f"{rates[name] / 24900:.2f}x"] for name, (_, model) in contenders.items()]
    lines += markdown_table(["contender", "params", "tokens/s", "vs transformers", "vs nanoGPT (24,900, issue #5)"], rows)
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results("Training throughput: GPT char-level (`python bench/bench_train.py`)", text)


if __name__ == "__main__":
    main()
