"""CPU benchmark suite (issue #5): lmforge and Hugging Face `transformers` side by side on the same
shapes and the same batches, in one invocation.

    python bench/bench_cpu.py                              # every work, default lengths (~20 minutes on 2 cores)
    python bench/bench_cpu.py --work gpt2_generate --rounds 5 --append
    python bench/bench_cpu.py --work gpt_char --char-loss  # + the 2000-iteration run: val loss vs nanoGPT's

Works (the rows of issue #5's table):
  gpt_char       GPT 4 layers x 128, 4 heads, block 64, batch 12 (nanoGPT's CPU config), tinyshakespeare chars
  bert_mlm       BERT 4 x 256, 4 heads, ffn 1024, WordPiece vocab 8000 trained on imdb_unsup, seq 128,
                 batch 16, 15% masked; the same masked batches for both
  gpt2_train     GPT-2 124M shape, seq 256, batch 4, random tokens
  gpt2_generate  GPT-2 124M shape, batch 1, 128 new tokens, greedy, KV cache (lmforge also with its
                 weight-only bf16 / int8 options); the fp32 bandwidth ceiling is measured here too
  prepare        text -> token ids for imdb_unsup with the vocab-8000 WordPiece tokenizer, MB/s

How it measures. Within a work, every contender is built in this process and timed in alternating
rounds (contender A, B, C, A, B, C, ...); the figure is the median round. Peak memory is the RSS
high-water mark (`ru_maxrss`) of a subprocess that builds and runs that contender alone, since one
process's high-water mark cannot be split between contenders. The child loads its data and imports
first, then restarts the high-water mark (Linux's clear_refs) and builds and runs the contender: "peak
RSS" is the mark after that, "over base" the same less the RSS before the build (the model, optimizer
state, activations and workspace of that contender alone). Run it on a quiet machine (the 1-minute
load average is printed with each work): on a shared 2-core machine other processes change the figures.
Threads: torch's default unless --threads; the count is printed and saved with the results.

litgpt as a further peer (gpt_char, gpt2_generate), when importable: its dependencies (lightning, an older
huggingface_hub) conflict with transformers', so install it into a venv of its own and point at that
venv's site-packages; only its model and generate code are used, the same torch runs everything:
    python3 -m venv /tmp/litvenv && /tmp/litvenv/bin/pip install torch==2.13.0 litgpt
    python bench/bench_cpu.py --peer-path /tmp/litvenv/lib/python3.11/site-packages
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from common import append_results, markdown_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
IMDB = SHARED / "imdb_unsup" / "imdb_unsup_even.txt"
CACHE = Path(tempfile.gettempdir()) / "lmforge-bench-cpu"
NANOGPT_TOK_S, NANOGPT_VAL_LOSS = 24_900, 1.886  # issue #5's table (2 cores, torch 2.13, 2026-11-23)
LITGPT_CHAR = "litgpt GPT (rotary, no biases, exact GELU: preset shakespeare_char's model)"
LITGPT_GEN = "litgpt generate (fp32)"
WORKS = ("gpt_char", "bert_mlm", "gpt2_train", "gpt2_generate", "prepare")


@dataclass
class Contender:
    """One side of a comparison: `run()` does one timed unit of work and `tokens` is how many tokens it
    processes (or, for prepare, bytes of text)."""

    run: Callable[[], object]
    tokens: int
    model: torch.nn.Module | None = None
    note: str = ""


def load1() -> float:
    return os.getloadavg()[0]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1e3  # kB
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Start the RSS high-water mark afresh (Linux >= 4.0: write 5 to /proc/self/clear_refs), so that data
    loading before the measured part does not count; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    """Current resident set size (MB)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The RSS high-water mark (MB): since `reset_peak_rss`, or since the process started."""
    try:
        return _status_mb("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: kB


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    return transformers


def have_litgpt() -> bool:
    return importlib.util.find_spec("litgpt") is not None


def litgpt_model(**kw) -> torch.nn.Module:
    """litgpt's GPT with a GPT-2-like block (LayerNorm, sequential residual, GELU MLP); litgpt always
    uses rotary positions (here on the whole head) and keeps an untied output head."""
    warnings.filterwarnings("ignore")
    from litgpt.config import Config
    from litgpt.model import GPT as LitGPT

    kw.setdefault("padded_vocab_size", kw["vocab_size"])
    cfg = Config(name="bench", rotary_percentage=1.0, parallel_residual=False, norm_class_name="LayerNorm",
                 mlp_class_name="GptNeoxMLP", **kw)
    return LitGPT(cfg)


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """The AdamW people write around a transformers model: decay on matrices, torch's default kernels."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def lmforge_trainer(model, objective, batcher, batch_size: int, lr: float, compile: bool = False):
    """A Trainer whose `_train_step` (the real loop body: objective, backward, clip, AdamW) is timed."""
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    cfg = TrainConfig(max_steps=10**9, batch_size=batch_size, lr=lr, warmup_steps=0, tensorboard=False,
                      progress=False, compile=compile, device="cpu")
    trainer = Trainer(model, objective, batcher, cfg, CACHE / "run", run_config={})
    state = {"step": 0}

    def step():
        trainer._train_step(state["step"])
        state["step"] += 1

    return step


def causal_lm_loss(m, b) -> torch.Tensor:
    """Next-token cross-entropy of a peer's causal LM on a CLMBatcher batch (transformers models return
    an output with `.logits`, litgpt's GPT the logits tensor itself)."""
    out = m(b["input_ids"])
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten())


def hf_train_step(model, batcher, loss_of, lr: float):
    """The plain loop around a transformers model: forward, loss, backward, clip, AdamW, zero_grad."""
    model.train()
    opt = adamw(model, lr)
    state = {"step": 0}

    def step():
        batch = batcher.train_batch(state["step"], 0)
        loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


# ---- gpt_char ----------------------------------------------------------------------------------------------
def char_tokens() -> tuple[np.ndarray, int, str]:
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
        stoi = {c: i for i, c in enumerate(sorted(set(text)))}
        return np.array([stoi[c] for c in text], dtype=np.uint16), len(stoi), "tinyshakespeare"
    return np.random.default_rng(0).integers(0, 65, 1_000_000).astype(np.uint16), 65, "random tokens (no ../shared)"


def gpt_char_contenders(args) -> dict[str, Callable[[], Contender]]:
    tokens, vocab, _ = char_tokens()
    n_train = int(len(tokens) * 0.9)  # nanoGPT's split: the first 90% of the characters
    train = SimpleNamespace(tokens=tokens[:n_train])
    shape = dict(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, d_model=128, dropout=0.0)

    def batcher():
        from lmforge.data.clm import CLMBatcher

        return CLMBatcher(train, None, seq_len=64, batch_size=12, seed=0)

    def lmforge(bias: bool, activation: str, compile: bool = False, position: str = "learned"):
        def build():
            from lmforge.models import build_model
            from lmforge.train.clm import CLMObjective

            torch.manual_seed(0)
            model = build_model("gpt", dict(shape, bias=bias, activation=activation, position=position))
            return Contender(lmforge_trainer(model, CLMObjective(), batcher(), 12, 1e-3, compile), 12 * 64, model)
        return build

    def hf(activation: str):
        def build():
            transformers = quiet_transformers()
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                          eos_token_id=0, activation_function=activation)
            cfg._attn_implementation = "sdpa"
            model = transformers.GPT2LMHeadModel(cfg)
            return Contender(hf_train_step(model, batcher(), causal_lm_loss, 1e-3), 12 * 64, model)
        return build

    out = {"lmforge GPT, nanoGPT's model (preset shakespeare_char_nanogpt: no biases, exact GELU)":
               lmforge(False, "gelu"),
           "lmforge GPT, preset shakespeare_char (the same with rotary positions)": lmforge(False, "gelu", position="rope"),
           "lmforge GPT, GPT-2's choices (biases, tanh GELU)": lmforge(True, "gelu_tanh")}
    if args.compile:
        out["lmforge GPT, nanoGPT's model, train.compile"] = lmforge(False, "gelu", compile=True)
    out["transformers GPT2LMHeadModel (GPT-2's choices: biases, tanh GELU)"] = hf("gelu_new")
    out["transformers GPT2LMHeadModel, exact GELU (biases)"] = hf("gelu")
    if have_litgpt():
        def lit():
            torch.manual_seed(0)
            model = litgpt_model(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False,
                                 intermediate_size=512, gelu_approximate="none")
            return Contender(hf_train_step(model, batcher(), causal_lm_loss, 1e-3), 12 * 64, model,
                             note="litgpt's GPT, the model of preset shakespeare_char (rotary positions, no biases, "
                                  "exact GELU; its output head untied: +8k parameters), the same plain loop as transformers'")
        out[LITGPT_CHAR] = lit
    return out


def char_loss_run(args) -> str:
    """nanoGPT's CPU run with lmforge (2000 iterations, its schedule, eval on the last 10%): val loss and the
    whole run's tokens/s, through the real Trainer.fit loop (validation included)."""
    from lmforge.data.clm import CLMBatcher
    from lmforge.models import build_model
    from lmforge.train.clm import CLMObjective
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import Trainer

    tokens, vocab, source = char_tokens()
    n_train = int(len(tokens) * 0.9)
    train, val = SimpleNamespace(tokens=tokens[:n_train]), SimpleNamespace(tokens=tokens[n_train:])
    torch.manual_seed(1337)
    model = build_model("gpt", dict(vocab_size=vocab, block_size=64, n_layer=4, n_head=4, d_model=128,
                                    dropout=0.0, bias=False, activation=args.char_activation))
    batcher = CLMBatcher(train, val, seq_len=64, batch_size=12, seed=1337)
    cfg = TrainConfig(max_steps=args.char_iters, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                      decay_steps=args.char_iters, eval_every=0, log_every=args.char_iters, tensorboard=False,
                      progress=False, device="cpu", seed=1337)
    trainer = Trainer(model, CLMObjective(), batcher, cfg, CACHE / "char-loss",
                      run_config={"arch": "gpt", "model": dataclasses.asdict(model.config)})
    t = time.perf_counter()
    result = trainer.fit()
    total = time.perf_counter() - t
    tok_s = args.char_iters * 12 * 64 / total
    return (f"lmforge `Trainer.fit`, nanoGPT's CPU run (GELU {args.char_activation}, {args.char_iters} iterations, "
            f"{source}, validation on the "
            f"last 10%): val loss **{result.val['loss']:.4f}** (nanoGPT: {NANOGPT_VAL_LOSS}); "
            f"{total:.1f} s, {tok_s:,.0f} tokens/s over the whole run including validation and checkpointing "
            f"(training steps alone: {result.train_tokens_per_s:,.0f} tokens/s in the last log window).")


# ---- bert_mlm ----------------------------------------------------------------------------------------------
def wordpiece_tokens(mb: float):
    """(tokenizer, tokens, doc_offsets, source): a WordPiece vocab 8000 trained on the first `mb` MB of
    imdb_unsup and that text tokenised (cached in the temp dir), or random ids when ../shared is absent."""
    from lmforge.text.tokenizer import Tokenizer, train_tokenizer

    if not IMDB.is_file():
        tok = train_tokenizer([f"w{i} w{i + 1} w{i * 7 % 7000}" for i in range(7000)], kind="wordpiece",
                              vocab_size=8000)
        ids = np.random.default_rng(0).integers(5, tok.vocab_size, 2_000_000).astype(np.uint16)
        return tok, ids, np.array([0, len(ids)]), "random ids (no ../shared)"
    CACHE.mkdir(parents=True, exist_ok=True)
    tok_path, ids_path = CACHE / f"wordpiece8000-{mb}MB.json", CACHE / f"imdb-{mb}MB.npz"
    docs = _imdb_docs(int(mb * 1e6))
    if tok_path.is_file():
        tok = Tokenizer.load(tok_path)
    else:
        tok = train_tokenizer(docs, kind="wordpiece", vocab_size=8000)
        tok.save(tok_path)
    if ids_path.is_file():
        z = np.load(ids_path)
        ids, offsets = z["ids"], z["offsets"]
    else:
        encoded = tok.encode_batch(docs)
        sep = tok.sep_id
        pieces = [np.array(e + [sep], dtype=np.uint16) for e in encoded]  # [SEP] after each review
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
        ids = np.concatenate(pieces)
        np.savez(ids_path, ids=ids, offsets=offsets)
    return tok, ids, offsets, f"imdb_unsup, first {mb:g} MB"


def _imdb_docs(limit_bytes: int | None = None) -> list[str]:
    """imdb_unsup's reviews (separated by a blank line; see its README), the first `limit_bytes` of the file."""
    with IMDB.open(encoding="utf-8") as f:
        text = f.read(limit_bytes) if limit_bytes else f.read()
    docs = [d.strip() for d in text.split("\n\n")]
    return [d for d in docs if d]


def bert_mlm_contenders(args) -> dict[str, Callable[[], Contender]]:
    T, B = 128, 16
    shape = dict(vocab_size=8000, max_position=T, n_layer=4, n_head=4, d_model=256, d_ff=1024)

    def batcher():
        from lmforge.data.mlm import Masker, MLMBatcher

        tok, ids, offsets, _ = wordpiece_tokens(args.bert_mb)
        train = SimpleNamespace(tokens=ids, doc_offsets=offsets)
        return MLMBatcher(Masker(tok, mask_prob=0.15), train, None, seq_len=T, batch_size=B, seed=0)

    def lmforge():
        from lmforge.models import build_model
        from lmforge.train.mlm import MLMObjective

        torch.manual_seed(0)
        model = build_model("bert", dict(shape))
        return Contender(lmforge_trainer(model, MLMObjective(), batcher(), B, 1e-4), B * T, model)

    def hf():
        transformers = quiet_transformers()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=1024, max_position_embeddings=T)
        cfg._attn_implementation = "sdpa"
        model = transformers.BertForMaskedLM(cfg)

        def loss_of(m, b):
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     token_type_ids=b["token_type_ids"], labels=b["labels"]).loss

        return Contender(hf_train_step(model, batcher(), loss_of, 1e-4), B * T, model)

    return {"lmforge Bert + MLM objective (Trainer step)": lmforge, "transformers BertForMaskedLM (sdpa)": hf}


# ---- gpt2_train ----------------------------------------------------------------------------------------------
GPT2 = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768, dropout=0.0)


def random_tokens(n: int = 1_000_000, vocab: int = 50257) -> SimpleNamespace:
    return SimpleNamespace(tokens=np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16))


def hf_gpt2(transformers, **kw):
    cfg = transformers.GPT2Config(vocab_size=GPT2["vocab_size"], n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256,
                                  eos_token_id=50256, **kw)
    cfg._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(cfg)


def gpt2_train_contenders(args) -> dict[str, Callable[[], Contender]]:
    T, B = args.gpt2_seq, args.gpt2_batch

    def batcher():
        from lmforge.data.clm import CLMBatcher

        return CLMBatcher(random_tokens(), None, seq_len=T, batch_size=B, seed=0)

    def lmforge(compile: bool = False):
        def build():
            from lmforge.models import build_model
            from lmforge.train.clm import CLMObjective

            torch.manual_seed(0)
            model = build_model("gpt", dict(GPT2))
            return Contender(lmforge_trainer(model, CLMObjective(), batcher(), B, 6e-4, compile), B * T, model)
        return build

    def hf():
        transformers = quiet_transformers()
        torch.manual_seed(0)
        model = hf_gpt2(transformers)
        return Contender(hf_train_step(model, batcher(), causal_lm_loss, 6e-4), B * T, model)

    out = {"lmforge GPT (Trainer step)": lmforge()}
    if args.compile:
        out["lmforge GPT (Trainer step, train.compile)"] = lmforge(compile=True)
    out["transformers GPT2LMHeadModel"] = hf
    return out


# ---- gpt2_generate -------------------------------------------------------------------------------------------
def gpt2_generate_contenders(args) -> dict[str, Callable[[], Contender]]:
    N, P = args.new_tokens, args.prompt_len
    prompt = torch.randint(0, GPT2["vocab_size"], (1, P), generator=torch.Generator().manual_seed(1))

    def lm_model():
        from lmforge.models import build_model

        torch.manual_seed(0)
        return build_model("gpt", dict(GPT2)).eval()

    def lmforge(weights: str | None):
        def build():
            from lmforge.generation import generate
            from lmforge.quantize import prepare_for_generation

            model = lm_model()
            if weights:  # what `lmforge generate --weights ...` does (fp32: the layout for decoding only)
                prepare_for_generation(model, weights)
            return Contender(lambda: generate(model, prompt, max_new_tokens=N)[0], N, model)
        return build

    def hf():
        transformers = quiet_transformers()
        from lmforge.interop.hf_convert import gpt_state_to_hf

        model = hf_gpt2(transformers).eval()
        model.load_state_dict(gpt_state_to_hf(lm_model()), strict=False)  # the same weights: same tokens
        kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True, pad_token_id=50256)

        def run():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)[0, P:].tolist()

        return Contender(run, N, model)

    def lit():
        from litgpt.generate.base import generate as lit_generate

        torch.manual_seed(0)
        model = litgpt_model(vocab_size=GPT2["vocab_size"], block_size=1024, n_layer=12, n_head=12, n_embd=768,
                             bias=True, intermediate_size=3072, gelu_approximate="tanh").eval()
        model.max_seq_length = P + N
        model.set_kv_cache(batch_size=1)

        def run():  # temperature 0: greedy (litgpt's own loop, its KV cache)
            with torch.inference_mode():
                return lit_generate(model, prompt[0], P + N, temperature=0.0, include_prompt=False).tolist()

        return Contender(run, N, model, note="litgpt's GPT-2-shaped model (rotary positions, untied head: the same "
                                             "495 MB of weights read per token), its `generate` with its KV cache")

    out = {"lmforge generate (fp32, plain model)": lmforge(None),
           "lmforge generate (fp32)": lmforge("fp32"),
           "lmforge generate (--weights fp16)": lmforge("fp16"),
           "lmforge generate (--weights bf16)": lmforge("bf16"),
           "lmforge generate (--weights int8)": lmforge("int8"),
           "transformers generate (fp32)": hf}
    if have_litgpt():
        out[LITGPT_GEN] = lit
    return out


def read_bandwidth_gbs(rounds: int = 5) -> float:
    """Memory read bandwidth: the best of `rounds` sums over 1 GiB (far beyond the caches), in GB/s."""
    x = torch.ones(256 * 2**20)
    x.sum()
    best = min(_timed(lambda: x.sum(), 1) for _ in range(rounds))
    return x.numel() * 4 / best / 1e9


def gemv_bound(model: torch.nn.Module) -> tuple[float, int]:
    """(passes/s, layers): every Linear of `model` (as prepared for decoding: `ChunkedLinear` included)
    applied to one random row, as decoding one token does, and nothing else."""
    from lmforge.quantize import ChunkedLinear

    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, ChunkedLinear))]
    xs = [torch.randn(1, m.in_features) for m in linears]

    def one_pass():
        for m, x in zip(linears, xs):
            m(x)

    with torch.inference_mode():
        one_pass()
        best = min(_timed(one_pass, 1) for _ in range(5))
    return 1 / best, len(linears)


def generation_extras(contenders: dict[str, Contender], rates: dict[str, float]) -> list[str]:
    """The fp32 ceiling (weight bytes per token / read bandwidth), agreement with transformers, and the
    weight-only options' distance from fp32."""
    lm = contenders["lmforge generate (fp32)"].model
    weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "wpe" not in n)
    bw = read_bandwidth_gbs()
    ceiling = bw * 1e9 / weight_bytes
    gemv = gemv_bound(contenders["lmforge generate (fp32)"].model)
    outs = {name: c.run() for name, c in contenders.items()}
    ref = outs["lmforge generate (fp32)"]
    lines = ["", f"fp32 ceiling: {weight_bytes / 1e6:.0f} MB of weights read per token (position table aside) at "
             f"{bw:.1f} GB/s (measured: sum over 1 GiB, same threads) = **{ceiling:.1f} tokens/s**; lmforge fp32 runs "
             f"at **{rates['lmforge generate (fp32)'] / ceiling:.0%}** of it, transformers at "
             f"{rates['transformers generate (fp32)'] / ceiling:.0%}. The fp32 matrix-vector products alone (the "
             f"model's {gemv[1]} Linear layers, one row of activations each, nothing else; best of 5) run at "
             f"{gemv[0]:.1f} passes/s = {gemv[0] / ceiling:.0%} of the ceiling ({gemv[0] * weight_bytes / 1e9:.1f} GB/s): "
             f"that is as fast as this machine's BLAS reads fp32 weights for one row of activations.", ""]
    for name, out in outs.items():
        if name in ("lmforge generate (fp32)", LITGPT_GEN):  # litgpt: another model (rotary), other tokens
            continue
        same = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), len(ref))
        lines.append(f"- {name}: greedy tokens equal to lmforge fp32 for the first {same} of {len(ref)}")
    return lines


def quality_lines(args) -> list[str]:
    """The weight-only options on a trained model: held-out perplexity and greedy agreement with fp32."""
    from lmforge.generation import generate
    from lmforge.quantize import prepare_for_generation
    from lmforge.train.checkpoint import find_checkpoint, load_pretrained

    candidates = [Path(args.quality_model)] if args.quality_model else [CACHE / "char-loss",
                                                                         Path("runs/shakespeare_char")]
    from lmforge.errors import LmforgeError

    ckpt = None
    for c in candidates:
        try:
            ckpt = find_checkpoint(c)
            load_pretrained(ckpt)
            break
        except LmforgeError:
            ckpt = None
    if ckpt is None or not SHAKESPEARE.is_file():
        return ["", "Quality on a trained model: skipped (no checkpoint; run --work gpt_char --char-loss first)."]
    text = SHAKESPEARE.read_text(encoding="utf-8")
    rows = []
    ref_tokens = None
    for weights in ("fp32", "fp16", "bf16", "int8"):
        model, tok, _ = load_pretrained(ckpt)
        prepare_for_generation(model, weights)
        ids = torch.tensor(tok.encode(text[int(len(text) * 0.9):]))
        T = model.config.block_size
        n = (len(ids) - 1) // T * T
        x, y = ids[:n].view(-1, T), ids[1:n + 1].view(-1, T)
        with torch.inference_mode():
            nll = sum(torch.nn.functional.cross_entropy(model(x[i:i + 64]).flatten(0, 1).float(),
                                                        y[i:i + 64].flatten(), reduction="sum").item()
                      for i in range(0, len(x), 64)) / y.numel()
        prompt = tok.encode(text[int(len(text) * 0.9):][:16])
        out = generate(model, [prompt], max_new_tokens=T - len(prompt))[0]
        ref_tokens = ref_tokens or out
        same = next((i for i, (a, b) in enumerate(zip(out, ref_tokens)) if a != b), len(ref_tokens))
        rows.append((weights, nll, same))
    base = rows[0][1]
    lines = ["", f"Quality on a trained model ({ckpt}; held-out = the last 10% of tinyshakespeare):", ""]
    lines += markdown_table(["weights", "val loss", "perplexity change", "greedy tokens equal to fp32"],
                            [[w, f"{nll:.4f}", f"{math.exp(nll - base) - 1:+.3%}", f"{same} of {len(ref_tokens)}"]
                             for w, nll, same in rows])
    return lines


# ---- prepare -------------------------------------------------------------------------------------------------
def prepare_contenders(args) -> dict[str, Callable[[], Contender]]:
    if not IMDB.is_file():
        return {}
    tok_path = CACHE / "wordpiece8000-prepare.json"
    size = IMDB.stat().st_size

    def tokenizer():
        from lmforge.text.tokenizer import Tokenizer, train_tokenizer

        if not tok_path.is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            train_tokenizer(_imdb_docs(int(args.bert_mb * 1e6)), kind="wordpiece", vocab_size=8000).save(tok_path)
        return Tokenizer.load(tok_path)

    def lmforge():
        from lmforge.data.prepare import prepare

        tokenizer()
        out = CACHE / "prepared"

        def run():
            with open(os.devnull, "w") as null:  # its summary lines
                stdout, sys.stdout = sys.stdout, null
                try:
                    prepare([str(IMDB)], str(out), str(tok_path), overwrite=True)  # documents: blank-line separated
                finally:
                    sys.stdout = stdout

        return Contender(run, size, note="reads, splits 90/10 by document, encodes, writes train/val .bin")

    def hf():
        transformers = quiet_transformers()
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer().backend)
        out = CACHE / "hf-prepared.bin"

        def run():
            ids = []
            docs = _imdb_docs()
            for i in range(0, len(docs), 1000):  # the batched `datasets.map` pattern
                ids.extend(tok(docs[i:i + 1000], add_special_tokens=False)["input_ids"])
            np.concatenate([np.array(x, dtype=np.uint16) for x in ids]).tofile(out)

        return Contender(run, size, note="reads, encodes in batches of 1000 reviews, writes one .bin")

    return {"lmforge prepare": lmforge, "transformers PreTrainedTokenizerFast loop": hf}


CONTENDERS = {"gpt_char": gpt_char_contenders, "bert_mlm": bert_mlm_contenders, "gpt2_train": gpt2_train_contenders,
              "gpt2_generate": gpt2_generate_contenders, "prepare": prepare_contenders}


# ---- timing, memory, report ----------------------------------------------------------------------------------
def _timed(fn: Callable[[], object], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t


def child_memory(work: str, name: str, args) -> dict:
    """Run one contender alone in a fresh process; its RSS before building and its high-water mark."""
    cmd = [sys.executable, __file__, "--child", work, name, "--threads", str(torch.get_num_threads()),
           *args.passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(work: str, name: str, args) -> None:
    builder = CONTENDERS[work](args)[name]
    if work == "bert_mlm":
        wordpiece_tokens(args.bert_mb)  # data loaded before the baseline
    import lmforge.train.trainer  # noqa: F401  (imports before the baseline too)
    if "transformers" in name:
        quiet_transformers()
    if name.startswith("litgpt"):
        import litgpt.model  # noqa: F401
    gc.collect()
    reset = reset_peak_rss()
    base = rss_mb()
    c = builder()
    for _ in range(args.memory_steps):
        c.run()
    print(json.dumps({"base_mb": base, "peak_mb": peak_rss_mb(), "reset": reset}))


def run_work(work: str, args) -> str | None:
    builders = CONTENDERS[work](args)
    if not builders:
        print(f"{work}: skipped (needs ../shared/data)")
        return None
    steps, warmup = (args.steps, args.warmup) if work in ("gpt_char", "bert_mlm") else (1, 1)
    if work == "gpt2_train":
        steps, warmup = args.gpt2_steps, 1
    load_before = load1()
    t0 = time.perf_counter()
    contenders = {name: build() for name, build in builders.items()}
    for c in contenders.values():
        c.first_s = _timed(c.run, 1)  # the first call: compiles, when a contender compiles
        _timed(c.run, warmup - 1)
    times = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, c in contenders.items():
            times[name].append(_timed(c.run, steps))
    load_after = load1()
    rates = {name: contenders[name].tokens * steps / statistics.median(ts) for name, ts in times.items()}
    peer = next(name for name in contenders if name.startswith("transformers"))
    unit = "MB/s of text" if work == "prepare" else "tokens/s"
    scale = 1e-6 if work == "prepare" else 1.0
    memory = {name: child_memory(work, name, args) for name in contenders} if args.memory else {}

    digits = 2 if scale < 1 else 0
    rows = []
    for name in contenders:
        spread = ", ".join(f"{contenders[name].tokens * steps / t * scale:,.{digits}f}" for t in times[name])
        m = memory.get(name, {})
        mem = ([f"{m['peak_mb']:,.0f} MB", f"{m['peak_mb'] - m['base_mb']:,.0f} MB"] if "peak_mb" in m
               else [m.get("error", "not measured"), ""])
        rows.append([name, f"**{rates[name] * scale:,.{digits}f}**", spread, f"{rates[name] / rates[peer]:.2f}x", *mem])
    lines = markdown_table(["contender", f"{unit} (median)", "rounds", f"vs {peer.split()[0]}", "peak RSS", "over base"], rows)
    if work == "gpt_char":
        ours = next(name for name in contenders if "nanoGPT's model" in name)
        lines.append(f"\nnanoGPT's figure on this kind of machine (issue #5, its model: no biases, exact GELU): "
                     f"{NANOGPT_TOK_S:,} tokens/s; lmforge with the same model at {rates[ours] / NANOGPT_TOK_S:.2f}x of it. "
                     f"Apples to apples with transformers: lmforge (biases, tanh GELU) vs GPT2LMHeadModel = "
                     f"{rates['lmforge GPT, GPT-2' + chr(39) + 's choices (biases, tanh GELU)'] / rates[peer]:.2f}x.")
        if LITGPT_CHAR in rates:
            rope = next(name for name in contenders if "preset shakespeare_char (" in name)
            lines.append(f"\nlmforge vs litgpt on the same model (rotary, no biases, exact GELU): "
                         f"{rates[rope] / rates[LITGPT_CHAR]:.2f}x.")
        if args.char_loss:
            lines += ["", char_loss_run(args)]
    if work == "gpt2_generate":
        if LITGPT_GEN in rates:
            lines.append(f"\nlmforge fp32 vs litgpt fp32: {rates['lmforge generate (fp32)'] / rates[LITGPT_GEN]:.2f}x; "
                         f"lmforge --weights fp16 vs litgpt fp32: "
                         f"{rates['lmforge generate (--weights fp16)'] / rates[LITGPT_GEN]:.2f}x.")
        lines += generation_extras(contenders, rates)
        lines += quality_lines(args)
    notes = [f"- {n}: {c.note}" for n, c in contenders.items() if c.note]
    title = {"gpt_char": "GPT char-level, 4 x 128, block 64, batch 12 (tinyshakespeare), training step",
             "bert_mlm": f"BERT MLM 4 x 256, ffn 1024, vocab 8000 WordPiece, seq 128, batch 16, 15% masked "
                         f"({wordpiece_tokens(args.bert_mb)[3]}), training step",
             "gpt2_train": f"GPT-2 124M shape training, seq {args.gpt2_seq}, batch {args.gpt2_batch}, random tokens",
             "gpt2_generate": f"GPT-2 124M shape generation, batch 1, prompt {args.prompt_len}, {args.new_tokens} new "
                              f"tokens greedy, KV cache",
             "prepare": f"prepare: imdb_unsup ({IMDB.stat().st_size / 1e6:.1f} MB) -> ids, WordPiece vocab 8000"}[work]
    per = {"gpt2_generate": "generate call", "prepare": "pass over the corpus"}.get(work, "step")
    notes += [f"- {n}: the first {per} took {c.first_s:.1f} s (compiling included), later ones "
              f"{statistics.median(times[n]) / steps:.2f} s" for n, c in contenders.items() if "compile" in n]
    body = "\n".join([f"{title}; {args.rounds} rounds x {steps} {per}{'s' if steps > 1 else ''} per contender, "
                      f"alternating; {torch.get_num_threads()} torch threads; 1-min load average "
                      f"{load_before:.2f} before, {load_after:.2f} after; {time.perf_counter() - t0:.0f} s", "",
                      *lines, *notes])
    print(f"\n### {work}\n{body}\n", flush=True)
    return f"### {work}\n\n{body}\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="all", choices=("all",) + WORKS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per work (median reported)")
    p.add_argument("--steps", type=int, default=30, help="training steps per round (gpt_char, bert_mlm)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first")
    p.add_argument("--gpt2-steps", type=int, default=2, help="training steps per round (gpt2_train)")
    p.add_argument("--gpt2-seq", type=int, default=256)
    p.add_argument("--gpt2-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128, help="gpt2_generate: tokens per generate call")
    p.add_argument("--prompt-len", type=int, default=16, help="gpt2_generate: prompt tokens")
    p.add_argument("--quality-model", default=None,
                   help="gpt2_generate: trained run/checkpoint for the weights' quality check (default: the "
                        "--char-loss run's, else runs/shakespeare_char)")
    p.add_argument("--bert-mb", type=float, default=4.0, help="MB of imdb_unsup for the BERT tokenizer and data")
    p.add_argument("--compile", action="store_true", help="gpt_char, gpt2_train: also lmforge with train.compile")
    p.add_argument("--char-loss", action="store_true", help="gpt_char: also nanoGPT's full run, val loss")
    p.add_argument("--char-iters", type=int, default=2000)
    p.add_argument("--char-activation", default="gelu", choices=("gelu", "gelu_tanh"),
                   help="GELU of the --char-loss run (nanoGPT's model uses the exact one)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS subprocesses")
    p.add_argument("--memory-steps", type=int, default=3, help="steps each memory subprocess runs")
    p.add_argument("--append", action="store_true", help="append the results to bench/RESULTS.md")
    p.add_argument("--peer-path", action="append", default=[],
                   help="a site-packages directory holding a peer (litgpt) whose dependencies conflict with "
                        "this venv's; appended to sys.path (see the module docstring)")
    p.add_argument("--child", nargs=2, metavar=("WORK", "CONTENDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.passthrough = [a for k in ("gpt2_seq", "gpt2_batch", "new_tokens", "prompt_len", "bert_mb")
                        for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))] + ["--compile"] * args.compile
    args.passthrough += [a for path in args.peer_path for a in ("--peer-path", path)]
    sys.path.extend(args.peer_path)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(*args.child, args)
        return
    works = WORKS if args.work == "all" else (args.work,)
    sections = [s for s in (run_work(w, args) for w in works) if s]
    if args.append and sections:
        cmd = "python bench/bench_cpu.py " + " ".join(sys.argv[1:])
        append_results(f"CPU suite, lmforge vs transformers (`{cmd.strip()}`)", "\n".join(sections))


if __name__ == "__main__":
    main()
