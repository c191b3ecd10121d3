"""Primitives shared by the model files: the one attention dispatch point, rotary embeddings, the KV cache.

Every model calls `attention(...)`; the backend (SDPA, which picks flash / memory-efficient / math
kernels itself) is chosen here and nowhere else. When attention weights are wanted (visualisation),
the explicit softmax(QK^T/sqrt(d)) path is used instead, with the same masking semantics.

One exception to SDPA's own choice: on CUDA without gradients (evaluation, generation, serving) the
cuDNN backend is left out. cuDNN builds an execution plan for every new shape (measured: ~44 ms per
call on an H100, bf16, torch 2.11, against ~0.3 ms for flash/memory-efficient), which is harmless for
training's fixed shapes but makes token-by-token decoding, whose key length grows every step, ~10x slower.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
        if q.is_cuda and not torch.is_grad_enabled():  # varying shapes: no cuDNN (see module docstring)
            with sdpa_kernel(_NO_CUDNN):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                     is_causal=is_causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 is_causal=is_causal)
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


# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE, Su et al. 2021), in the "rotate half" layout of GPT-NeoX / Llama:
# the first and second halves of each head's features form the (x, y) pairs that are rotated.
# ---------------------------------------------------------------------------------------------------


def rope_angles(position_ids: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles for the given positions, computed on the fly (no length limit).

    Args:
        position_ids: (B, T) or (1, T) integer positions.
        head_dim: features per head (even).
        base: the wavelength base; pair i turns at rate base^(-2i/head_dim).

    Returns:
        (cos, sin), each (B|1, 1, T, head_dim) in fp32, broadcastable over heads.
    """
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, head_dim): both halves of a pair share an angle
    return angles.cos()[:, None], angles.sin()[:, None]  # (B, 1, T, head_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate q or k (B, n_head, T, head_dim) by the angles from `rope_angles`."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, n_head, T, head_dim)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# KV cache for incremental decoding
# ---------------------------------------------------------------------------------------------------


class KVCache:
    """A static key/value cache: per layer, preallocated K and V buffers of shape
    (B, n_head, max_len, head_dim), filled in place. Positions [0, length) hold the keys and values of
    the tokens seen so far; a forward pass with new tokens writes them at [length, length + T) with
    `update` (every layer), then the model calls `advance(T)` once.

    The buffers never grow or move, so decoding allocates nothing per step (and the cache can be
    captured by CUDA graphs / torch.compile). `reorder` permutes the batch for beam search.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.length = 0  # tokens cached so far (the same for every row; padding is handled by masks)

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0) if self.k else 0

    @property
    def max_len(self) -> int:
        return self.k[0].size(2) if self.k else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_head, T, head_dim) at positions [length, length + T) of `layer`;
        return that layer's K and V over [0, length + T) (views, no copy)."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (called once per forward pass, after all layers)."""
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Replace row i of the batch by row index[i] (beam search), in place."""
        n = self.length
        for buf in self.k + self.v:
            buf[:, :, :n] = buf[:, :, :n].index_select(0, index)

    def reset(self) -> None:
        """Forget everything cached (the buffers are reused)."""
        self.length = 0
