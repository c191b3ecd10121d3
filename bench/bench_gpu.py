"""GPU training throughput and model FLOPs utilisation: GPT-2 124M in bf16, lmforge vs transformers,
in one process on the same random tokens and batch.

    python bench/bench_gpu.py [--batch 16] [--seq 1024] [--steps 30] [--no-compile] [--append]

lmforge runs its own trainer step (bf16 autocast, SDPA flash attention, fused AdamW, torch.compile);
transformers runs GPT2LMHeadModel (sdpa) in the loop people write, with the same autocast, fused AdamW
and clipping, compiled too when lmforge is (so the comparison is of the models and loops, not of
compile on/off). MFU = model FLOPs per token (6N + 12 * n_layer * d_model * seq, the PaLM/nanoGPT
estimate) x tokens/s / the bf16 matmul peak measured here on an 8192^3 matmul.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from common import append_results, markdown_table


def matmul_peak(dtype=torch.bfloat16, n=8192, iters=30) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq: int) -> float:
    return 6 * n_params + 12 * n_layer * d_model * seq


def bench(step, n_steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n_steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n_steps


def lmforge_step(tokens, args):
    from lmforge.data.clm import CLMBatcher
    from lmforge.models import build_model
    from lmforge.train.clm import CLMObjective
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    torch.manual_seed(0)
    model = build_model("gpt", dict(vocab_size=50304, block_size=args.seq, n_layer=12, n_head=12, d_model=768,
                                    dropout=0.0, bias=True))
    batcher = CLMBatcher(SimpleNamespace(tokens=tokens), None, seq_len=args.seq, batch_size=args.batch, seed=0)
    cfg = TrainConfig(max_steps=10**6, batch_size=args.batch, lr=6e-4, min_lr=6e-5, warmup_steps=0, device="cuda",
                      precision="bf16", tensorboard=False, progress=False, compile=not args.no_compile)
    tr = Trainer(model, CLMObjective(), batcher, cfg, "/tmp/lmforge-gpu-bench", run_config={})
    state = {"i": 0}

    def step():
        tr._train_step(state["i"])
        state["i"] += 1

    return step, model


def transformers_step(tokens, args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.data.clm import CLMBatcher

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50304, n_positions=args.seq, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(cfg).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=True)
    fwd = torch.compile(model) if not args.no_compile else model
    batcher = CLMBatcher(SimpleNamespace(tokens=tokens), None, seq_len=args.seq, batch_size=args.batch, seed=0)
    state = {"i": 0}

    def step():
        b = batcher.train_batch(state["i"], 0)
        x, y = b["input_ids"].cuda(non_blocking=True), b["labels"].cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["i"] += 1

    return step, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--append", action="store_true")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak()
    tokens = np.random.default_rng(0).integers(0, 50257, 5_000_000).astype(np.uint16)
    tok_per_step = args.batch * args.seq
    rows = []
    for name, make in (("lmforge GPT", lmforge_step), ("transformers GPT2LMHeadModel", transformers_step)):
        step, model = make(tokens, args)
        n = sum(p.numel() for p in model.parameters())
        torch.cuda.reset_peak_memory_stats()
        dt = bench(step, args.steps, args.warmup)
        tps = tok_per_step / dt
        mfu = flops_per_token(n, 12, 768, args.seq) * tps / peak
        rows.append((name, n, dt, tps, mfu, torch.cuda.max_memory_allocated() / 2**30))
        del step, model
        torch.cuda.empty_cache()
    ref = rows[1][3]
    lines = [f"GPT-2 124M shape, bf16 autocast, batch {args.batch} x seq {args.seq}, "
             f"compile {'off' if args.no_compile else 'on'}, {args.steps} timed steps; "
             f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", ""]
    lines += markdown_table(["contender", "params", "ms/step", "tokens/s", "MFU", "peak memory", "vs transformers"],
                            [[name, f"{n / 1e6:.1f}M", f"{dt * 1e3:.1f}", f"{tps:,.0f}", f"{mfu:.1%}", f"{mem:.1f} GiB",
                              f"{tps / ref:.2f}x"] for name, n, dt, tps, mfu, mem in rows])
    text = "\n".join(lines)
    print(text)
    if args.append:
        append_results("GPU training: GPT-2 124M bf16 (`python bench/bench_gpu.py`)", text)


if __name__ == "__main__":
    main()
