"""GPT: a decoder-only Transformer language model, the GPT-2 architecture as nanoGPT writes it.

Token (+ learned position) embeddings, `n_layer` pre-LayerNorm blocks (causal self-attention and a
GELU MLP, each added to the residual stream), a final LayerNorm and a language-model head tied to the
token embedding. Parameter names are GPT-2's (`transformer.h.0.attn.c_attn.weight`, ...), so GPT-2
weights map 1:1 (Hugging Face stores its Conv1D weights transposed; the interop module handles that).
`position="rope"` swaps the learned position table for rotary embeddings applied to q and k.

Calling conventions:
  * `model(input_ids)` -> logits (B, T, vocab). Training uses this path: no mask, SDPA `is_causal`.
  * `attention_mask` (B, T_total): 1 = real token, 0 = padding (left padding for batched prompts);
    padding keys are never attended to and positions count real tokens only.
  * `cache=model.new_cache(B, max_len)`: incremental decoding; each call appends its tokens' keys and
    values to the cache in place and attends over everything cached so far.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.layers import KVCache, apply_rope, attention, rope_angles


@dataclass
class GPTConfig:
    """Sizes and options of a GPT model.

    Args:
        vocab_size: tokens in the vocabulary (GPT-2's 50257 padded up to a multiple of 64 for speed).
        block_size: the longest sequence the model accepts (the size of the learned position table).
        n_layer: number of Transformer blocks.
        n_head: attention heads per block.
        d_model: width of the residual stream (a multiple of n_head).
        d_ff: hidden width of the MLP (None: 4 * d_model).
        dropout: dropout on embeddings, attention probabilities and residual branches (0 for inference).
        bias: biases in Linear layers and LayerNorms (GPT-2: true; a little faster and better without).
        activation: 'gelu_tanh' (the tanh approximation GPT-2 uses) or 'gelu' (exact erf).
        position: 'learned' absolute position embeddings (GPT-2) or 'rope' rotary embeddings.
        rope_base: wavelength base of the rotary embeddings (position='rope' only).
        tie_embeddings: the output head shares its weight matrix with the token embedding.
        layer_norm_eps: epsilon of every LayerNorm.
        init_std: standard deviation of the normal weight init (residual projections get
            init_std / sqrt(2 * n_layer)).
    """

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int | None = None
    dropout: float = 0.0
    bias: bool = True
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"
    position: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ConfigError(f"d_ff must be positive (or null for 4 * d_model), got {self.d_ff}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("gelu_tanh", "gelu"):
            raise ConfigError(f"activation must be 'gelu_tanh' or 'gelu', got {self.activation!r}")
        if self.position not in ("learned", "rope"):
            raise ConfigError(f"position must be 'learned' or 'rope', got {self.position!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"position 'rope' needs an even head size, got d_model / n_head = {self.head_dim}")
        if self.rope_base <= 0:
            raise ConfigError(f"rope_base must be positive, got {self.rope_base}")
        if self.layer_norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("layer_norm_eps and init_std must be positive")

    context_field: ClassVar[str] = "block_size"  # the field that `context_length` reads

    @property
    def context_length(self) -> int:
        """The context length in tokens (the same name in every model config); with rope it is the
        length trained on, not a hard limit."""
        return self.block_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused q/k/v projection."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache is ours

    def forward(self, x, *, rope=None, mask=None, is_causal=False, cache: KVCache | None = None,
                need_weights=False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, n_head, T, head_dim), views of qkv
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_head, past + T, head_dim)
        y, weights = attention(q, k, v, attn_mask=mask, is_causal=is_causal, need_weights=need_weights,
                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, d_model): heads side by side
        return self.resid_dropout(self.c_proj(y)), weights


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, **attn_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), **attn_kwargs)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPT(nn.Module):
    """The GPT language model: token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            **({"wpe": nn.Embedding(cfg.block_size, cfg.d_model)} if cfg.position == "learned" else {}),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # GPT-2 init: N(0, init_std) everywhere, zero biases, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_seq_len(self) -> int | None:
        """The longest sequence (prompt + generated) the model accepts; None = no fixed limit (rope)."""
        return self.config.block_size if self.config.position == "learned" else None

    def use_heads(self, *names: str) -> "GPT":
        """Train the LM head ('lm') or, without it, freeze it (an untied `lm_head` would otherwise get no
        gradient when only `encode` runs, which DDP does not allow; a tied one is the token embedding and
        stays trainable). Returns the model."""
        if any(n != "lm" for n in names):
            raise ConfigError(f"unknown GPT head {next(n for n in names if n != 'lm')!r}; heads: lm")
        if not self.config.tie_embeddings:
            self.lm_head.weight.requires_grad_("lm" in names)
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once). nanoGPT's convention: `non_embedding` subtracts the
        position embeddings; the token embeddings stay, as they double as the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def describe(self) -> str:
        c = self.config
        return (f"GPT: {self.num_params() / 1e6:.2f}M parameters ({c.n_layer} layers, {c.n_head} heads, "
                f"d_model {c.d_model}, block {c.block_size}{', rope' if c.position == 'rope' else ''})")

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty static KV cache for `batch_size` rows and up to `max_len` positions
        (dtype and device default to the model's)."""
        w = self.transformer.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.head_dim,
                       dtype=dtype or w.dtype, device=device or w.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_attentions: bool = False,
        logits_to_keep: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Next-token logits.

        Args:
            input_ids: (B, T) token ids (the new tokens only when a cache is given).
            position_ids: (B, T) or (1, T) positions; default: counted from the cache length, or from
                the real tokens of `attention_mask` when one is given.
            attention_mask: (B, past + T), 1 = real token, 0 = padding; covers the cached tokens too.
            cache: a `new_cache(...)`; the new tokens' keys/values are appended to it in place.
            output_attentions: also return each layer's attention probabilities (B, n_head, T, past + T).
            logits_to_keep: n > 0 computes the logits of the last n positions only (generation needs the
                last one: skipping the head elsewhere saves a (T - 1) x d_model x vocab product on a prompt).

        Returns:
            logits (B, T, vocab_size) (T = logits_to_keep when given) in the model's dtype, or
            (logits, attentions) when output_attentions.
        """
        x, attentions = self._trunk(input_ids, position_ids, attention_mask, cache, output_attentions)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        return (logits, attentions) if output_attentions else logits

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_model) final hidden states (after ln_f, before lm_head).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 = real token, 0 = padding (as in `forward`: padding keys are never
                attended and positions count real tokens only).
            token_type_ids: ignored (GPT has no segment embeddings); accepted so that every backbone
                takes the same arguments.
        """
        return self.transformer.ln_f(self._trunk(input_ids, None, attention_mask, None, False)[0])

    def _trunk(self, input_ids, position_ids, attention_mask, cache, output_attentions: bool):
        """(hidden states before ln_f (B, T, d_model), per-layer attention probabilities or None)."""
        cfg = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        total = past + T
        if cfg.position == "learned" and total > cfg.block_size:
            raise ConfigError(f"sequence of {total} tokens exceeds the model's block_size {cfg.block_size}")
        if cache is not None and (cache.batch_size != B or total > cache.max_len):
            raise ValueError(f"cache holds {cache.batch_size} rows x {cache.max_len} positions; "
                             f"got {B} rows needing {total}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, total):
            raise ValueError(f"attention_mask must be (batch, cached + new) = ({B}, {total}), "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, total, device=input_ids.device)[None]  # (1, T)
            else:  # count real tokens only, so a left-padded prompt starts at position 0
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        mask, is_causal = self._mask(attention_mask, past, T, input_ids.device)

        x = self.transformer.wte(input_ids)  # (B, T, d_model)
        rope = None
        if cfg.position == "learned":
            x = x + self.transformer.wpe(position_ids)
        else:
            rope = rope_angles(position_ids, cfg.head_dim, cfg.rope_base)
        x = self.transformer.drop(x)
        attentions = []
        for block in self.transformer.h:
            x, weights = block(x, rope=rope, mask=mask, is_causal=is_causal, cache=cache,
                               need_weights=output_attentions)
            attentions.append(weights)
        if cache is not None:
            cache.advance(T)
        return x, (tuple(attentions) if output_attentions else None)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, past: int, T: int, device) -> tuple[torch.Tensor | None, bool]:
        """(boolean mask broadcastable to (B, n_head, T, past + T) with True = may attend, is_causal)."""
        if attention_mask is None:
            if past == 0:
                return None, True  # training and prefill: SDPA's own causal mask (the flash path)
            if T == 1:
                return None, False  # one new token may see everything cached
        q_pos = torch.arange(past, past + T, device=device)[:, None]  # (T, 1) absolute query positions
        k_pos = torch.arange(past + T, device=device)[None, :]  # (1, past + T)
        mask = k_pos <= q_pos  # (T, past + T) causal
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]  # (B, T, past + T): no padding keys
            # A padding query would have no key left at all (softmax of nothing = NaN, and NaN times a
            # zero weight is still NaN downstream); let every query see itself. Real tokens never see padding.
            mask = mask | (k_pos == q_pos)
        return mask.unsqueeze(-3), False  # (B or 1, 1, T, past + T)
