"""Text generation for any lmforge language model: greedy decoding, sampling (temperature, top-k,
top-p, repetition penalty) and beam search, with the semantics of Hugging Face `generate` so that it
can serve as the reference in tests.

The model interface (everything `generate` relies on):

    model(input_ids, position_ids=..., attention_mask=..., cache=...) -> logits (B, T, vocab)
        input_ids       (B, T) the tokens to feed: the whole (left-padded) prompt first, then one new
                        token per row per step when a cache is used, or the whole sequence every step
                        without one (`use_cache=False`, `cache=None`).
        position_ids    (B, T) positions counting real tokens only (a left-padded prompt starts at 0).
        attention_mask  (B, cached + T) 1 = real token, 0 = padding; None when no row is padded.
                        Models must ignore padded positions (attention masks them; a recurrent model
                        must keep its state unchanged across them).
        cache           the object `new_cache` returned; the call updates it in place.
        logits_to_keep  optional: when `forward` has this parameter, generation passes 1 and the model may
                        return the last position's logits only (B, 1, vocab), skipping its head elsewhere.
    model.new_cache(batch_size, max_len) -> a cache for `batch_size` rows and up to `max_len` positions,
        with `cache.reorder(index: LongTensor)` (row i becomes old row index[i]; used by beam search).
    model.max_seq_len   optional int | None: the longest prompt + generation the model accepts.

`generate` switches the model to eval mode for the call (and back), runs under `torch.inference_mode`,
and never touches the global RNG (sampling uses a local `torch.Generator`).

What is returned: per prompt, the new tokens only. Generation of a row ends at `eos_token_id` (which is
*not* included in the output), right after a stop sequence (which *is* included: it is content; the
text-level recipe trims it), or after `max_new_tokens`.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError


def generate(
    model: nn.Module,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt; return the new tokens per prompt (eos dropped, stop sequences kept).

    Args:
        model: a language model with the interface in the module docstring.
        input_ids: prompts as lists of token ids (any lengths: they are left-padded into one batch),
            or a LongTensor (T,) for one prompt / (B, T) for B unpadded prompts.
        max_new_tokens: the most tokens to generate per prompt.
        do_sample: sample from the (filtered) distribution; False = greedy (or beam search).
        temperature: divide the logits by this before sampling.
        top_k: sample among the k most likely tokens only (None or 0: no limit).
        top_p: nucleus sampling: the smallest set of most likely tokens whose probability reaches
            top_p (the top token always stays); None or 1.0: no limit.
        repetition_penalty: CTRL's penalty on tokens already in the prompt or output: positive logits
            are divided by it, negative ones multiplied (1.0: off; >1 discourages repeats).
        num_beams: beams per prompt; >1 runs beam search (deterministic, do_sample must be False).
        length_penalty: beam search ranks a finished hypothesis by sum(log p) / length ** length_penalty
            (length in generated tokens, eos included): >0 favours longer outputs, <0 shorter.
        early_stopping: beam search stops for a prompt once num_beams hypotheses have finished.
        eos_token_id: the token that ends a sequence.
        pad_token_id: filler for left padding (never attended to); default eos_token_id or 0.
        stop_sequences: token sequences that end generation once the output ends with one of them.
        seed: makes sampling reproducible.
        use_cache: use the model's cache (False recomputes the whole sequence each step; same tokens).

    Returns:
        One list of new token ids per prompt, in order.
    """
    prompts = _prompts(input_ids)
    stops = [list(s) for s in (stop_sequences or [])]
    _check(model, prompts, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
           num_beams, stops)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids, mask = _left_pad(prompts, pad, device)
            stop_t = [torch.tensor(s, device=device) for s in stops]
            if num_beams > 1:
                return _beam_search(model, ids, mask, max_new_tokens, num_beams, length_penalty, early_stopping,
                                    eos_token_id, stop_t, repetition_penalty, use_cache)
            return _decode(model, ids, mask, max_new_tokens, do_sample, temperature, top_k or 0, top_p or 1.0,
                           repetition_penalty, eos_token_id, stop_t, seed, use_cache)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Logit processors (public: small, pure, tested against hand-computed cases)
# --------------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / HF repetition penalty: for tokens with `seen` (B, V) True, divide positive logits by
    `penalty` and multiply negative ones by it (so the token always becomes less likely for penalty > 1)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept), set the rest to -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p
    (the most likely token always stays), set the rest to -inf."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = before >= p  # the set above already reached p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(filtered logits / temperature) (HF order: temperature, top-k, top-p)."""
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------------
# Input checks and batching
# --------------------------------------------------------------------------------------------------


def _prompts(input_ids) -> list[list[int]]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            raise ConfigError(f"input_ids must be an integer tensor (T,) or (B, T), got {tuple(input_ids.shape)} "
                              f"{input_ids.dtype}")
        return input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in input_ids):
        raise ConfigError("input_ids must be a list of prompts, each a list of token ids")
    return [list(p) for p in input_ids]


def _check(model, prompts, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
           num_beams, stops) -> None:
    if not prompts:
        raise ConfigError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty; start it with a token (e.g. the eos/bos token)")
        if not all(isinstance(t, int) and t >= 0 for t in p):
            raise ConfigError(f"prompt {i} must hold non-negative integer token ids")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and any(t >= vocab for p in prompts for t in p):
        raise ConfigError(f"a prompt token id is >= the model's vocab_size {vocab}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 for sampling, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"top_k must be >= 1 (or None/0 for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ConfigError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ConfigError("beam search is deterministic: use num_beams > 1 or do_sample, not both")
    if any(not s or not all(isinstance(t, int) and t >= 0 for t in s) for s in stops):
        raise ConfigError("each stop sequence must be a non-empty list of token ids")
    limit = getattr(model, "max_seq_len", None)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest > limit:
        raise ConfigError(f"prompt of {longest} tokens is longer than the model's context of {limit} tokens")
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                          f"context of {limit} tokens; lower max_new_tokens to {limit - longest}")


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P)) with shorter prompts padded on the left (1 = real token)."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


PREFILL_CHUNK = 4096  # prompt tokens per forward call for models without a context limit


class _Stepper:
    """Feeds the model: the prompt first, then one token per row per step, with or without a cache.
    Holds the whole (B, P + N) token/mask/position buffers, so nothing grows while decoding."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new: int, use_cache: bool):
        B, P = ids.shape
        self.model, self.len = model, P
        self.padded = bool((mask == 0).any())  # once, on the host: no mask at all when nothing is padded
        self.seq = torch.cat([ids, ids.new_zeros(B, max_new)], 1)  # (B, P + N)
        self.mask = torch.cat([mask, mask.new_ones(B, max_new)], 1)  # (B, P + N)
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, P + N): real tokens counted from 0
        self.cache = model.new_cache(B, P + max_new) if use_cache else None
        # Only the last position's logits are used: a model that can skip the head elsewhere is asked to.
        forward = getattr(model, "forward", None)
        self.extra = {"logits_to_keep": 1} if forward and "logits_to_keep" in inspect.signature(forward).parameters else {}

    def _forward(self, start: int) -> torch.Tensor:
        end = self.len
        logits = self.model(self.seq[:, start:end], position_ids=self.pos[:, start:end],
                            attention_mask=self.mask[:, :end] if self.padded else None, cache=self.cache,
                            **self.extra)
        return logits[:, -1].float()  # (B, V)

    def first(self) -> torch.Tensor:
        """Next-token logits (B, V) after the prompt. A model without a context limit (recurrent) reads
        a long prompt through its cache in chunks of PREFILL_CHUNK tokens: the same state, with memory
        bounded by the chunk instead of growing with the prompt (a few MB of text would need tens of GB)."""
        start = 0
        if self.cache is not None and getattr(self.model, "max_seq_len", None) is None:
            end = self.len
            for stop in range(PREFILL_CHUNK, end, PREFILL_CHUNK):
                self.len = stop
                self._forward(start)
                start = stop
            self.len = end
        return self._forward(start)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (B,) and return the next-token logits (B, V)."""
        self.seq[:, self.len] = tokens
        self.len += 1
        return self._forward(self.len - 1 if self.cache is not None else 0)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (beam search)."""
        self.seq, self.mask, self.pos = self.seq[index], self.mask[index], self.pos[index]
        if self.cache is not None:
            self.cache.reorder(index)


def _ends_with(out: torch.Tensor, t: int, stops: list[torch.Tensor]) -> torch.Tensor:
    """(rows,) bool: does out[:, :t + 1] end with one of the stop sequences?"""
    hit = torch.zeros(out.size(0), dtype=torch.bool, device=out.device)
    for s in stops:
        if len(s) <= t + 1:
            hit |= (out[:, t + 1 - len(s):t + 1] == s).all(-1)
    return hit


def _seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur among the real (unpadded) tokens of each row."""
    counts = torch.zeros(ids.size(0), vocab, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, mask.long()) > 0


# --------------------------------------------------------------------------------------------------
# Greedy / sampling
# --------------------------------------------------------------------------------------------------


def _decode(model, ids, mask, N, do_sample, temperature, top_k, top_p, repetition_penalty, eos, stops, seed,
            use_cache) -> list[list[int]]:
    B = ids.size(0)
    stepper = _Stepper(model, ids, mask, N, use_cache)
    logits = stepper.first()
    generator = None
    if do_sample:  # a local generator: reproducible with `seed`, and the global RNG is left alone
        generator = torch.Generator(device=ids.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    seen = _seen_tokens(ids, mask, logits.size(-1)) if repetition_penalty != 1.0 else None
    out = torch.zeros(B, N, dtype=torch.long, device=ids.device)
    lengths = torch.full((B,), N, device=ids.device)  # where each row's output ends
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for t in range(N):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        tok = sample_next(logits, temperature, top_k, top_p, generator) if do_sample else logits.argmax(-1)  # (B,)
        out[:, t] = tok
        if seen is not None:
            seen[torch.arange(B, device=ids.device), tok] = True
        if eos is not None or stops:
            at_eos = tok == eos if eos is not None else torch.zeros_like(done)
            at_stop = _ends_with(out, t, stops) & ~at_eos
            lengths = torch.where(~done & at_eos, t, lengths)  # eos dropped
            lengths = torch.where(~done & at_stop, t + 1, lengths)  # stop sequence kept
            done |= at_eos | at_stop
            if bool(done.all()):  # one host sync per step, only when something can stop early
                break
        if t + 1 < N:
            logits = stepper.next(tok)
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]


# --------------------------------------------------------------------------------------------------
# Beam search (the vectorised algorithm of HF transformers >= 4.50)
# --------------------------------------------------------------------------------------------------


def _beam_search(model, ids, mask, N, nb, length_penalty, early_stopping, eos, stops, repetition_penalty,
                 use_cache) -> list[list[int]]:
    """Each step, every running beam proposes every token; the 2 * nb best (by summed log-prob) are
    kept as candidates. Candidates that end (eos, stop sequence, or the last step) and rank among the
    top nb become finished hypotheses, scored sum_logprobs / length ** length_penalty; the best nb
    that do not end continue. A prompt is done when nb hypotheses have finished (early_stopping) or
    when no running beam can beat the worst finished one. Returns the best finished hypothesis."""
    B, dev = ids.size(0), ids.device
    stepper = _Stepper(model, ids.repeat_interleave(nb, 0), mask.repeat_interleave(nb, 0), N, use_cache)
    logits = stepper.first()  # (B * nb, V); row b * nb + j is beam j of prompt b
    V = logits.size(-1)
    K = min(2 * nb, nb * V)
    neg_inf = float("-inf")
    run_seq = torch.zeros(B, nb, N, dtype=torch.long, device=dev)  # running beams' generated tokens
    run_score = torch.zeros(B, nb, device=dev)
    run_score[:, 1:] = neg_inf  # the beams start identical: let only beam 0 expand at first
    fin_seq = torch.zeros(B, nb, N, dtype=torch.long, device=dev)  # finished hypotheses, best first
    fin_score = torch.full((B, nb), neg_inf, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    fin_real = torch.zeros(B, nb, dtype=torch.bool, device=dev)  # slot holds a real hypothesis
    improvable = torch.ones(B, dtype=torch.bool, device=dev)
    in_top_nb = torch.arange(K, device=dev) < nb  # only the best nb candidates may finish
    row_base = torch.arange(B, device=dev)[:, None] * nb
    P = ids.size(1)
    seen = _seen_tokens(stepper.seq[:, :P], stepper.mask[:, :P], V) if repetition_penalty != 1.0 else None

    for t in range(N):
        logp = logits.log_softmax(-1)  # (B * nb, V)
        if seen is not None:  # HF applies its processors to the log-probs in beam search
            logp = apply_repetition_penalty(logp, seen, repetition_penalty)
        cand = (logp.view(B, nb, V) + run_score[..., None]).view(B, nb * V)
        top_score, top_idx = cand.topk(K, dim=-1)  # (B, K), best first
        src, tok = top_idx // V, top_idx % V  # which beam each candidate extends, and with which token
        seq_k = run_seq.gather(1, src[..., None].expand(B, K, N)).clone()  # (B, K, N)
        seq_k[:, :, t] = tok
        ends = torch.full((B, K), t == N - 1, dtype=torch.bool, device=dev)
        if eos is not None:
            ends |= tok == eos
        if stops:
            ends |= _ends_with(seq_k.view(B * K, N), t, stops).view(B, K)

        # beams that go on: the best nb candidates that did not end
        run_score, keep = top_score.masked_fill(ends, neg_inf).topk(nb, dim=-1)  # (B, nb)
        run_seq = seq_k.gather(1, keep[..., None].expand(B, nb, N))
        beam_src = src.gather(1, keep)  # (B, nb)

        # hypotheses that end here join the finished ones; keep the best nb
        full = fin_real.all(-1) & early_stopping
        accept = ends & in_top_nb & torch.isfinite(top_score) & (improvable & ~full)[:, None]
        new_score = torch.where(accept, top_score / (t + 1) ** length_penalty, neg_inf)
        best = torch.cat([fin_score, new_score], 1).topk(nb, dim=-1).indices  # (B, nb)
        fin_score = torch.cat([fin_score, new_score], 1).gather(1, best)
        fin_real = torch.cat([fin_real, accept], 1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(new_score, t + 1, dtype=torch.long)], 1).gather(1, best)
        fin_seq = torch.cat([fin_seq, seq_k], 1).gather(1, best[..., None].expand(B, nb, N))

        # HF's stopping heuristic: can the best running beam still beat the worst finished hypothesis?
        filled = fin_real.all(-1)
        best_possible = run_score[:, 0] / (t + 1) ** length_penalty
        improvable &= ~filled | (best_possible > fin_score.min(-1).values)
        if t == N - 1 or bool((~improvable | (filled & early_stopping)).all()):
            break
        index = (row_base + beam_src).view(-1)  # (B * nb,) global rows the new beams come from
        stepper.reorder(index)
        if seen is not None:
            seen = seen[index]
            seen[torch.arange(B * nb, device=dev), run_seq[:, :, t].reshape(-1)] = True
        logits = stepper.next(run_seq[:, :, t].reshape(-1))

    outputs = []
    for row, n in zip(fin_seq[:, 0].tolist(), fin_len[:, 0].tolist()):
        row = row[:n]
        outputs.append(row[:-1] if eos is not None and row and row[-1] == eos else row)
    return outputs
