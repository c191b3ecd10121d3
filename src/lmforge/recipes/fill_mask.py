"""`lmforge fill_mask`: what a masked-LM model (BERT) predicts for the [MASK] tokens of a sentence.

The quick look at a pretrained encoder: `lmforge fill_mask runs/bert_en_small --text "the movie was [MASK] ."`
prints, for every [MASK], the most likely tokens with their probabilities (the same figures as
transformers' `fill-mask` pipeline on the same weights).
"""
from __future__ import annotations

import torch

from lmforge.errors import ConfigError


@torch.no_grad()
def predict_masks(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, int, float]]]:
    """For each [MASK] of `text`, in order: its `top_k` (token, id, probability), most likely first.

    Args:
        model: a `Bert` with its MLM head, in eval mode.
        tokenizer: its tokenizer ([CLS] [SEP] [MASK]); `text` is encoded as `[CLS] text [SEP]`.
        text: a sentence holding one or more literal `[MASK]` tokens.
        top_k: predictions per mask (at most the vocabulary size).
    """
    mask_id = tokenizer.mask_id
    if mask_id is None or tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise ConfigError("fill_mask needs a tokenizer with [CLS] [SEP] [MASK] (a BERT-family model)")
    ids = tokenizer.encode_for_model([text], padding=False)["input_ids"][0]  # [CLS] text [SEP], the tokenizer's template
    positions = [i for i, t in enumerate(ids) if t == mask_id]
    if not positions:
        raise ConfigError(f"text {text!r} holds no [MASK] token")
    limit = model.config.context_length
    if len(ids) > limit:
        raise ConfigError(f"text {text!r} is {len(ids)} tokens with [CLS] and [SEP]; the model takes at most {limit}")
    device = next(model.parameters()).device
    hidden = model.encode(torch.tensor([ids], device=device))  # (1, T, d_model)
    probs = model.mlm_logits(hidden[0, positions]).float().softmax(-1)  # (masks, vocab)
    k = min(top_k, probs.size(-1))
    top = probs.topk(k, dim=-1)
    return [[(tokenizer.decode([i]), i, p) for p, i in zip(ps.tolist(), ix.tolist())]
            for ps, ix in zip(top.values, top.indices)]


def fill_mask(model: str, text: list[str], top_k: int = 5, device: str = "cpu") -> list[list[list[dict]]]:
    """Predict the [MASK] tokens of sentences with a masked-LM model.

    Args:
        model: an lmforge run or checkpoint directory of a BERT trained with mlm, or a transformers
            BERT directory with its MLM head.
        text: sentences holding `[MASK]` tokens (`--text "..." --text "..."`).
        top_k: predictions shown per [MASK].
        device: cpu, cuda, cuda:1, ...
    """
    from lmforge.checkpoints import load_model
    from lmforge.train.config import check_device

    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    if not text:
        raise ConfigError("give at least one sentence with --text")
    check_device(device, "device")
    net, tokenizer, cfg = load_model(model, device)
    if cfg.get("arch") != "bert":
        raise ConfigError(f"{model}: fill_mask needs a BERT-family masked LM (arch bert), this is arch {cfg.get('arch')!r}")
    if "MLM head" in cfg.get("interop", {}).get("random_init", []):
        raise ConfigError(f"{model}: its weights have no MLM head (a BertModel); fill_mask needs a masked LM "
                          f"such as BertForMaskedLM")
    if cfg.get("objective") == "simcse" and not cfg.get("init_from"):
        raise ConfigError(f"{model}: trained with simcse from a random init, its MLM head was never trained")
    results = []
    for sentence in text:
        masks = predict_masks(net, tokenizer, sentence, top_k)
        print(sentence)
        for n, preds in enumerate(masks, 1):
            shown = ", ".join(f"{tok} {p:.3f}" for tok, _, p in preds)
            print(f"  [MASK] {n}: {shown}" if len(masks) > 1 else f"  {shown}")
        results.append([[{"token": tok, "id": i, "score": p} for tok, i, p in preds] for preds in masks])
    return results

