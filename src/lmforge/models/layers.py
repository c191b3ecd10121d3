"""Primitives shared by the model files: the one attention dispatch point, rotary embeddings, GELU.

Every model calls `attention(...)`; the backend (SDPA, which picks flash / memory-efficient / math
kernels itself) is chosen here and nowhere else. When attention weights are wanted (visualisation),
the explicit softmax(QK^T/sqrt(d)) path is used instead, with the same masking semantics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention.

    Args:
        q, k, v: (B, n_head, T_q, head_dim), (B, n_head, T_k, head_dim), (B, n_head, T_k, head_dim).
        attn_mask: bool (True = may attend) or additive float mask, broadcastable to (B, n_head, T_q, T_k).
        is_causal: lower-triangular mask aligned to the top-left (use only when T_q == T_k).
        dropout_p: attention-probability dropout (pass 0.0 in eval mode).
        need_weights: also return the (B, n_head, T_q, T_k) attention probabilities (explicit path).

    Returns:
        (output (B, n_head, T_q, head_dim), weights or None)
    """
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        return out, None
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, Tq, Tk)
    if is_causal:
        tq, tk = scores.shape[-2:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = F.dropout(weights, p=dropout_p) @ v if dropout_p > 0 else weights @ v
    return out, weights
