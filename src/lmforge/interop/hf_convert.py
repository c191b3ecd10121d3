"""Config and weight conversion between Hugging Face `transformers` and lmforge: the one place where
transformers' names appear. Pure functions over dicts and tensors; `hf.py` does the files.

BERT: transformers' BertModel names without the `bert.` prefix are ours; BertForMaskedLM and
BertForPreTraining prefix the backbone with `bert.`; the MLM decoder is tied to the word embeddings.
GPT-2: our names are GPT-2's, but transformers' Conv1D stores (in, out) matrices where nn.Linear
stores (out, in), so those four weights per block are transposed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.errors import CheckpointError

# activation names: transformers -> ours (several transformers names are the same function)
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# buffers that transformers keeps in some checkpoints; they carry no learned values
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids", ".attn.bias", ".attn.masked_bias")
# GPT-2's Conv1D layers store (in, out) matrices; our nn.Linear stores (out, in)
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# BERT's optional parts: name prefix -> what it is (for the "randomly initialised" report)
BERT_HEADS = {"pooler.": "pooler", "cls.predictions.": "MLM head", "cls.seq_relationship.": "NSP head"}


# ---- configs ------------------------------------------------------------------------------------------
def _activation(name: Any, where: str) -> str:
    if name not in _ACT_IN:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (supported: {', '.join(_ACT_IN)})")
    return _ACT_IN[name]


def _require(hf: dict[str, Any], key: str, expected: Any, where: str, default: Any) -> None:
    value = hf.get(key, default)
    if value != expected:
        raise CheckpointError(f"{where}: {key}={value!r} cannot be represented in lmforge (needs {expected!r})")


def bert_config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _require(hf, "position_embedding_type", "absolute", where, "absolute")
    _require(hf, "is_decoder", False, where, False)
    _require(hf, "add_cross_attention", False, where, False)
    if hf.get("embedding_size", hf.get("hidden_size")) != hf.get("hidden_size"):
        raise CheckpointError(f"{where}: embedding_size {hf['embedding_size']} != hidden_size (factorised embeddings are not supported)")
    return dict(
        vocab_size=hf["vocab_size"], max_position=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
        dropout=hf.get("hidden_dropout_prob", 0.1), attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), activation=_activation(hf.get("hidden_act", "gelu"), where),
        pad_token_id=hf.get("pad_token_id") or 0, pre_ln=False, init_std=hf.get("initializer_range", 0.02))


def gpt_config_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    _require(hf, "scale_attn_weights", True, where, True)
    _require(hf, "scale_attn_by_inverse_layer_idx", False, where, False)
    _require(hf, "add_cross_attention", False, where, False)
    return dict(
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
        n_head=hf["n_head"], d_model=hf["n_embd"], d_ff=hf.get("n_inner"), dropout=hf.get("resid_pdrop", 0.1),
        bias=True, activation=_activation(hf.get("activation_function", "gelu_new"), where), position="learned",
        tie_embeddings=hf.get("tie_word_embeddings", True), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02))


def bert_config_to_hf(cfg: Any, architecture: str) -> dict[str, Any]:
    if cfg.pre_ln:
        raise CheckpointError("a pre-LN BERT (model.pre_ln=true) has no transformers equivalent; only post-LN BERT exports")
    if cfg.position != "learned":
        raise CheckpointError(f"a BERT with model.position={cfg.position!r} has no transformers BERT equivalent "
                              "(BERT learns absolute positions); only position='learned' exports")
    return {"architectures": [architecture], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.d_ff, "hidden_act": _ACT_OUT[cfg.activation],
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
            "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
            "initializer_range": cfg.init_std, "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id,
            "position_embedding_type": "absolute", "classifier_dropout": None, "is_decoder": False,
            "tie_word_embeddings": True, "use_cache": True, "dtype": "float32"}


def gpt_config_to_hf(cfg: Any, eos_id: int | None) -> dict[str, Any]:
    if cfg.position != "learned":
        raise CheckpointError(f"a GPT with position={cfg.position!r} has no GPT-2 equivalent (GPT-2 learns absolute positions)")
    eos = eos_id  # None for a tokenizer without an end-of-text token (char)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.d_ff, "activation_function": _ACT_OUT[cfg.activation], "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.layer_norm_eps,
            "initializer_range": cfg.init_std, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
            "bos_token_id": eos, "eos_token_id": eos, "dtype": "float32"}


# ---- weights: transformers names <-> ours ---------------------------------------------------------------
def _is_buffer(key: str) -> bool:
    return any(key.endswith(b) for b in _BUFFERS)


def bert_state_from_hf(hf_state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, t in hf_state.items():
        key = key.removeprefix("bert.")
        if _is_buffer(key):
            continue
        if "LayerNorm." in key:  # checkpoints converted from TensorFlow name LayerNorm gamma/beta
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        state[key] = t
    decoder_bias = state.pop("cls.predictions.decoder.bias", None)
    if "cls.predictions.bias" not in state and decoder_bias is not None:
        state["cls.predictions.bias"] = decoder_bias
    decoder = state.pop("cls.predictions.decoder.weight", None)
    words = state.get("embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise CheckpointError(f"{where}: the MLM decoder is not tied to the word embeddings (lmforge's BERT always ties them)")
    return state


def gpt_state_from_hf(hf_state: dict[str, torch.Tensor], tied: bool, where: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, t in hf_state.items():
        if _is_buffer(key):
            continue
        if key != "lm_head.weight":
            key = "transformer." + key.removeprefix("transformer.")
            if key.endswith(_CONV1D) and t.dim() == 2:
                t = t.t()
        state[key] = t
    if tied:
        head = state.pop("lm_head.weight", None)
        words = state.get("transformer.wte.weight")
        if head is not None and words is not None and not torch.equal(head, words):
            raise CheckpointError(f"{where}: lm_head differs from the token embeddings but config.json says they are tied")
    return state


def bert_state_to_hf(model: nn.Module, architecture: str) -> dict[str, torch.Tensor]:
    """State dict with transformers' names for `architecture` (tied decoder left out, as transformers saves)."""
    keep = {"BertModel": ("pooler.",), "BertForMaskedLM": ("cls.predictions.",),
            "BertForPreTraining": tuple(BERT_HEADS)}[architecture]  # the optional parts this class has
    out = {}
    for key, t in model.state_dict().items():
        if key == "cls.predictions.decoder.weight":
            continue
        head = next((p for p in BERT_HEADS if key.startswith(p)), None)
        if head is not None and head not in keep:
            continue
        prefix = "bert." if architecture != "BertModel" and not key.startswith("cls.") else ""
        out[prefix + key] = t
    return out


def gpt_state_to_hf(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if key.endswith(_CONV1D):
            t = t.t().contiguous()
        out[key] = t
    if not cfg.bias:  # GPT-2 always has biases: zeros are exactly "no bias"
        for key, t in list(out.items()):
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                out[key[: -len("weight")] + "bias"] = torch.zeros_like(t)
            elif key.endswith(_CONV1D):
                out[key[: -len("weight")] + "bias"] = torch.zeros(t.shape[1], dtype=t.dtype)
    return out
