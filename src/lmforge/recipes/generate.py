"""`lmforge generate`: continue prompts with a trained model.

Build (load the model and tokenizer: an lmforge run or checkpoint, or a transformers GPT-2 directory), generate (in batches of
left-padded prompts), print. Text-level stop strings are handled here: they are passed to the
library as token sequences (which stop generation when the model emits exactly that tokenization)
and the decoded text is always cut at the first stop string.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.generation import generate as generate_ids
from lmforge.quantize import prepare_for_generation
from lmforge.checkpoints import load_model

ROWS_PER_CALL = 32  # prompts x samples decoded together in one batch


def generate(
    model: str,
    prompt: str | list[str] | None = None,
    prompt_file: str | None = None,
    max_new_tokens: int = 200,
    strategy: Literal["sample", "greedy", "beam"] = "sample",
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    device: str = "auto",
    use_cache: bool = True,
    weights: Literal["fp32", "fp16", "bf16", "int8"] = "fp32",
) -> list[str]:
    """Generate text from a trained model: print each prompt with its completion and return them.

    Args:
        model: an lmforge run directory (its newest checkpoint is used) or checkpoint directory, or a
            transformers GPT-2 directory.
        prompt: one or more prompts; an empty prompt starts from the end-of-text token
            (an unconditional sample). Default: one empty prompt.
        prompt_file: a UTF-8 text file whose whole content is one more prompt (a final newline is dropped).
        max_new_tokens: the most tokens to generate per sample (lowered to fit the model's context).
        strategy: 'sample' (temperature / top_k / top_p), 'greedy', or 'beam' (num_beams / length_penalty).
        temperature: sampling temperature (strategy 'sample').
        top_k: sample among the k most likely tokens (strategy 'sample'; null: no limit).
        top_p: nucleus sampling probability mass (strategy 'sample'; null: no limit).
        num_beams: beams per prompt (strategy 'beam').
        length_penalty: beam score = sum log p / length ** length_penalty (strategy 'beam').
        repetition_penalty: >1 discourages tokens already in the prompt or the output (1: off).
        stop: strings that end a completion; the completion is cut before the first one.
        seed: makes sampling reproducible.
        num_samples: completions per prompt (strategy 'sample' only).
        device: 'auto' (CUDA if present, else CPU), 'cpu', 'cuda', 'cuda:1', ...
        use_cache: decode with the model's KV cache (much faster; same tokens).
        weights: how the Linear weights are held while generating: 'fp32' (as trained, laid out for
            decoding), or weight-only low precision, 'fp16', 'bf16' or 'int8' (fewer bytes read per token:
            faster when memory bandwidth is the limit, as on a CPU; close to fp32, not identical).

    Returns:
        The texts (prompt + completion), prompts in order, each prompt's samples together.
    """
    prompts = _prompts(prompt, prompt_file)
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > 1 and strategy != "sample":
        raise ConfigError(f"num_samples > 1 needs strategy 'sample' ({strategy} gives the same text every time)")
    if strategy not in ("sample", "greedy", "beam"):
        raise ConfigError(f"strategy must be 'sample', 'greedy' or 'beam', got {strategy!r}")
    stops = [s for s in (stop or []) if s]

    net, tok, cfg = load_model(model, device=_device(device))
    if cfg.get("arch") == "bert":
        raise ConfigError(f"{model}: a BERT encoder does not generate text; give a causal LM (gpt, lstm)")
    prepare_for_generation(net, weights)
    encoded = [_encode(tok, p) for p in prompts]
    max_new_tokens = _fit_context(net, encoded, max_new_tokens)
    options = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, use_cache=use_cache,
                   eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                   stop_sequences=[ids for ids in (tok.encode(s) for s in stops) if ids] or None)
    if strategy == "sample":
        options.update(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    elif strategy == "beam":
        options.update(num_beams=num_beams, length_penalty=length_penalty)

    rows = [(i, ids) for i, ids in enumerate(encoded) for _ in range(num_samples)]
    texts = []
    for n, start in enumerate(range(0, len(rows), ROWS_PER_CALL)):
        chunk = rows[start:start + ROWS_PER_CALL]
        outs = generate_ids(net, [ids for _, ids in chunk], seed=None if seed is None else seed + n, **options)
        for (i, _), out in zip(chunk, outs):
            texts.append(prompts[i] + _cut(tok.decode(out), stops))
            print(texts[-1], flush=True)
            print("-" * 60, flush=True)
    return texts


def _prompts(prompt: str | list[str] | None, prompt_file: str | None) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise DataError(f"{path}: prompt file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        prompts.append(text[:-1] if text.endswith("\n") else text)
    return prompts or [""]


def _device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; a name that is no device, or a device this machine lacks,
    is a ConfigError."""
    from lmforge.train.config import check_device

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name, "device")
    return torch.device(name)


def _encode(tok, text: str) -> list[int]:
    """Token ids of a prompt; an empty prompt is the end-of-text token (start of a new document)."""
    if not text:
        if tok.eos_id is None:
            raise ConfigError("an empty prompt needs a tokenizer with an end-of-text token; give a prompt")
        return [tok.eos_id]
    ids = tok.encode(text)
    if not ids:
        raise ConfigError(f"prompt {text[:40]!r} encodes to no tokens")
    return ids


def _fit_context(net, encoded: list[list[int]], max_new_tokens: int) -> int:
    """max_new_tokens, lowered (with a note) so that the longest prompt plus the output fits the context."""
    limit = getattr(net, "max_seq_len", None)
    longest = max(len(ids) for ids in encoded)
    if limit is None or longest + max_new_tokens <= limit:
        return max_new_tokens
    if longest >= limit:
        raise ConfigError(f"prompt of {longest} tokens leaves no room in the model's context of {limit} tokens")
    print(f"note: max_new_tokens lowered from {max_new_tokens} to {limit - longest} to fit the model's context "
          f"of {limit} tokens", file=sys.stderr)
    return limit - longest


def _cut(text: str, stops: list[str]) -> str:
    """`text` up to (not including) the first stop string."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]
