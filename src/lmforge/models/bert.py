"""BERT: a bidirectional Transformer encoder with the masked-LM and next-sentence pretraining heads.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language Understanding".
Parameter names follow Hugging Face's `BertForPreTraining` (without its `bert.` prefix on the
backbone), so BERT-family checkpoints (BERT, MiniLM, ...) map onto this model 1:1:

    embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm
    encoder.layer.{i}.attention.self.{query,key,value}   encoder.layer.{i}.attention.output.{dense,LayerNorm}
    encoder.layer.{i}.intermediate.dense                  encoder.layer.{i}.output.{dense,LayerNorm}
    pooler.dense
    cls.predictions.transform.{dense,LayerNorm}, cls.predictions.decoder (tied to word_embeddings),
    cls.predictions.bias, cls.seq_relationship

The original is post-LN (LayerNorm after each residual add). `pre_ln=True` moves the LayerNorms in
front of attention and the feed-forward and adds a final LayerNorm (`encoder.LayerNorm`), which trains
more stably from scratch at high learning rates (Xiong et al. 2020).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.models.layers import apply_rope, attention, rope_angles


@dataclass
class BertConfig:
    """Shape of a BERT encoder.

    Args:
        vocab_size: tokenizer vocabulary size.
        max_position: longest sequence (the size of the learned position table; with rope, the longest
            input accepted).
        type_vocab_size: number of segment ids (2: sentence A / sentence B).
        n_layer: Transformer blocks.
        n_head: attention heads per block.
        d_model: hidden size.
        d_ff: feed-forward inner size.
        dropout: dropout on embeddings and on every residual branch.
        attn_dropout: dropout on the attention probabilities.
        layer_norm_eps: LayerNorm epsilon (1e-12 as in BERT).
        activation: feed-forward activation: 'gelu' (exact erf GELU, as BERT), 'gelu_tanh' or 'relu'.
        pad_token_id: id of [PAD] (its embedding row starts at zero).
        pre_ln: LayerNorm before attention/FFN plus a final LayerNorm (for training from scratch).
        init_std: std of the normal initialisation of weight matrices and embeddings.
        position: 'learned' absolute position embeddings (BERT) or 'rope' rotary embeddings on q and k
            (no position table; relative offsets are built into attention, which a small encoder trained
            from scratch learns to use much sooner; no transformers BERT equivalent, so no HF export).
        rope_base: wavelength base of the rotary embeddings (position='rope' only).
    """

    vocab_size: int = 30522
    max_position: int = 512
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    pad_token_id: int = 0
    pre_ln: bool = False
    init_std: float = 0.02
    position: Literal["learned", "rope"] = "learned"
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_position", "type_vocab_size", "n_layer", "n_head", "d_model", "d_ff"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"model.pad_token_id ({self.pad_token_id}) must be a token id below vocab_size ({self.vocab_size})")
        if self.layer_norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.layer_norm_eps and model.init_std must be positive")
        if self.position not in ("learned", "rope"):
            raise ConfigError(f"model.position must be 'learned' or 'rope', got {self.position!r}")
        if self.position == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(f"model.position 'rope' needs an even head size, got d_model / n_head = {self.d_model // self.n_head}")
        if self.rope_base <= 0:
            raise ConfigError(f"model.rope_base must be positive, got {self.rope_base}")

    context_field: ClassVar[str] = "max_position"  # the field that `context_length` reads

    @property
    def context_length(self) -> int:
        """The longest input in tokens (the same name in every model config)."""
        return self.max_position


def _activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}[name]()


@dataclass
class EncoderOutput:
    """What `Bert.forward` returns.

    last_hidden_state: (B, T, d_model) final hidden states.
    pooled: (B, d_model) tanh(dense(hidden of [CLS])), the input of the NSP head (with `nsp=True`, else None).
    nsp_logits: (B, 2) next-sentence logits, index 0 = is next, 1 = random (with `nsp=True`, else None).
    mlm_logits: (N, vocab) logits at the requested `mlm_positions`, else None.
    attentions: per layer (B, n_head, T, T) attention probabilities when asked, else None.
    """

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor | None = None
    nsp_logits: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class Embeddings(nn.Module):
    """word + position + segment embeddings, then LayerNorm and dropout (no position table with rope)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.d_model) if cfg.position == "learned" else None
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(torch.arange(input_ids.size(1), device=input_ids.device))
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention projections; the softmax goes through `layers.attention`."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.attn_dropout = cfg.attn_dropout
        self.query = nn.Linear(cfg.d_model, cfg.d_model)
        self.key = nn.Linear(cfg.d_model, cfg.d_model)
        self.value = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, need_weights: bool, rope=None):
        B, T, d = x.shape
        # (B, T, d) -> (B, n_head, T, head_dim)
        q, k, v = (proj(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for proj in (self.query, self.key, self.value))
        if rope is not None:  # (cos, sin) from rope_angles
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out, weights = attention(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                                 need_weights=need_weights)
        return out.transpose(1, 2).reshape(B, T, d), weights


class DenseNorm(nn.Module):
    """A residual branch's output projection with its LayerNorm (HF's BertSelfOutput / BertOutput).
    The residual add and where the LayerNorm sits (post- or pre-LN) are decided in `Layer`."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.d_model)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)


class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseNorm(cfg.d_model, cfg)


class Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_ff)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    """One Transformer block: self-attention then feed-forward, each a residual branch."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.d_ff, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, need_weights: bool, rope=None):
        att, ffn = self.attention.output, self.output
        if self.pre_ln:  # x + f(LN(x))
            a, weights = self.attention.self(att.LayerNorm(x), mask, need_weights, rope)
            x = x + att.dropout(att.dense(a))
            x = x + ffn.dropout(ffn.dense(self.intermediate(ffn.LayerNorm(x))))
        else:  # LN(x + f(x)), as the original BERT
            a, weights = self.attention.self(x, mask, need_weights, rope)
            x = att.LayerNorm(x + att.dropout(att.dense(a)))
            x = ffn.LayerNorm(x + ffn.dropout(ffn.dense(self.intermediate(x))))
        return x, weights


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        # Pre-LN leaves the residual stream un-normalised; a final LayerNorm fixes its scale.
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.pre_ln else None


# ---- pretraining heads: each a module of its own, run only when asked for -------------------------------
class Pooler(nn.Module):
    """tanh(dense(h_[CLS])): the sentence vector that BERT's NSP head reads."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class Transform(nn.Module):
    """dense -> activation -> LayerNorm, before the MLM decoder."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = _activation(cfg.activation)
        self.LayerNorm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class MLMHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = Transform(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # weight tied to word_embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class PretrainingHeads(nn.Module):
    """The container HF names `cls`: the MLM head (`predictions`) and the NSP classifier (`seq_relationship`)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.predictions = MLMHead(cfg)
        self.seq_relationship = nn.Linear(cfg.d_model, 2)


# head name -> the parameter-name prefixes it trains (the NSP head reads the pooler's output)
HEADS: dict[str, tuple[str, ...]] = {
    "pooler": ("pooler.",),
    "mlm": ("cls.predictions.",),  # its decoder is tied to the word embeddings, which are not the head's
    "nsp": ("pooler.", "cls.seq_relationship."),
}


class Bert(nn.Module):
    """BERT encoder with its pretraining heads (pooler, masked LM, next-sentence prediction).

    `encode` runs the encoder alone; `forward` runs the encoder plus only the heads asked for
    (`mlm_positions`, `nsp`). `use_heads` freezes the heads a training run does not use, so that every
    trainable parameter gets a gradient in every step (DDP then needs no static graph); all heads stay
    in the model under their HF names, so checkpoints and exports keep them as they are.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.cls = PretrainingHeads(config)
        self.apply(self._init_weights)
        self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight  # weight tying

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation: N(0, init_std) matrices and embeddings, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_attentions: bool = False,
        mlm_positions: torch.Tensor | None = None,
        nsp: bool = False,
    ) -> EncoderOutput:
        """Encode a batch.

        Args:
            input_ids: (B, T) token ids, T <= max_position.
            attention_mask: (B, T), 1/True = real token, 0/False = padding (padding keys are never attended).
            token_type_ids: (B, T) segment ids (default all 0).
            output_attentions: also return every layer's attention probabilities.
            mlm_positions: if given, also compute the MLM logits there (see `mlm_logits`); passing it
                here rather than calling `mlm_logits` keeps the whole loss inside forward, as DDP and
                torch.compile want.
            nsp: also run the pooler and the next-sentence head (`pooled`, `nsp_logits`).
        """
        x, attentions = self._hidden_states(input_ids, attention_mask, token_type_ids, output_attentions)
        pooled = self.pooler(x) if nsp else None
        return EncoderOutput(
            last_hidden_state=x,
            pooled=pooled,
            nsp_logits=self.nsp_logits(pooled) if nsp else None,
            mlm_logits=None if mlm_positions is None else self.mlm_logits(x, mlm_positions),
            attentions=attentions,
        )

    def use_heads(self, *names: str) -> "Bert":
        """Train the named pretraining heads ('pooler', 'mlm', 'nsp') and freeze the others
        (requires_grad=False: they keep their weights, DDP and the optimizer leave them out). Call it
        before wrapping the model for training; no names = the encoder alone. Returns the model."""
        unknown = [n for n in names if n not in HEADS]
        if unknown:
            raise ConfigError(f"unknown BERT head {unknown[0]!r}; heads: {', '.join(HEADS)}")
        trained = tuple(p for n in names for p in HEADS[n])
        every = tuple(p for prefixes in HEADS.values() for p in prefixes)
        for name, param in self.named_parameters():  # tied weights are listed once, under the embeddings
            if name.startswith(every):
                param.requires_grad_(name.startswith(trained))
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_model) final hidden states (after the final LayerNorm of a pre-LN model), no head run.

        Args:
            input_ids: (B, T) token ids, T <= max_position.
            attention_mask: (B, T), 1/True = real token, 0/False = padding.
            token_type_ids: (B, T) segment ids (default all 0).
        """
        return self._hidden_states(input_ids, attention_mask, token_type_ids, False)[0]

    def _hidden_states(self, input_ids, attention_mask, token_type_ids, output_attentions: bool):
        """(final hidden states (B, T, d_model), per-layer attention probabilities or None)."""
        B, T = input_ids.shape
        if T > self.config.max_position:
            raise ConfigError(f"sequence of {T} tokens is longer than model.max_position ({self.config.max_position})")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys a query may attend to
        x = self.embeddings(input_ids, token_type_ids)
        rope = None
        if self.config.position == "rope":
            rope = rope_angles(torch.arange(T, device=input_ids.device)[None], self.config.d_model // self.config.n_head,
                               self.config.rope_base)
        attentions = []
        for layer in self.encoder.layer:
            x, weights = layer(x, mask, output_attentions, rope)
            attentions.append(weights)
        if self.encoder.LayerNorm is not None:
            x = self.encoder.LayerNorm(x)
        return x, (tuple(attentions) if output_attentions else None)

    def mlm_logits(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits. The head (a d x d transform and the d x vocab decoder) runs only at the
        selected positions: gathering first is much cheaper than decoding all B*T positions.

        Args:
            hidden: (B, T, d_model) from `forward`.
            positions: None (all positions: returns (B, T, vocab)); a bool (B, T) mask; or a long (N,)
                tensor of flat indices into the B*T positions. Both of the latter return (N, vocab).
        """
        if positions is None:
            return self.cls.predictions(hidden)
        flat = hidden.flatten(0, 1)  # (B*T, d)
        picked = flat[positions.flatten()] if positions.dtype == torch.bool else flat.index_select(0, positions)
        return self.cls.predictions(picked)  # (N, vocab)

    def nsp_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, 2) next-sentence logits from the pooled [CLS] vector (0 = is next, 1 = random)."""
        return self.cls.seq_relationship(pooled)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` leaves out the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            e = self.embeddings
            n -= sum(m.weight.numel() for m in (e.word_embeddings, e.position_embeddings, e.token_type_embeddings)
                     if m is not None)
        return n

    def describe(self) -> str:
        c = self.config
        kind = "pre-LN" if c.pre_ln else "post-LN"
        return (f"BERT ({kind}): {c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, d_ff {c.d_ff}, "
                f"vocab {c.vocab_size}, max_position {c.max_position}{', rope' if c.position == 'rope' else ''}; "
                f"{self.num_params() / 1e6:.2f}M parameters ({self.num_params(True) / 1e6:.2f}M non-embedding)")
