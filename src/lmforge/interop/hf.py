"""Hugging Face `transformers` directories in and out: BERT family (BERT, MiniLM, ...) and GPT-2.

Nothing here imports `transformers`: a directory is `config.json` + `model.safetensors` (or sharded
safetensors, or `pytorch_model.bin` read with `weights_only=True`) + tokenizer files, read and written
directly. The name and config maps live in `hf_convert.py`, the tokenizer files in `hf_tokenizer.py`.

    load_hf(dir)                     -> (model, tokenizer, run config)   HF directory -> lmforge
    export_hf(model, tokenizer, out) -> out                              lmforge -> HF directory

Every verb reads models through `lmforge.checkpoints.load_model` (`lmforge.load_model`), which
sends transformers directories and named sources here.

The run config that `load_hf` returns is what `save_checkpoint` writes: `arch`, `model` and an
`interop` section saying where the weights came from and which heads were not in them (and so are
randomly initialised). `export_hf` writes the transformers class that holds what was trained:
BertModel, BertForMaskedLM or BertForPreTraining; GPT2LMHeadModel.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.checkpoints import load_model, unwrap
from lmforge.config import to_dict
from lmforge.errors import CheckpointError, LmforgeError
from lmforge.interop.hf_convert import (BERT_HEADS, bert_config_from_hf, bert_config_to_hf, bert_state_from_hf,
                                        bert_state_to_hf, gpt_config_from_hf, gpt_config_to_hf, gpt_state_from_hf,
                                        gpt_state_to_hf)
from lmforge.storage import atomic_dir, atomic_write_json, load_tensors, read_json, save_tensors, torch_load

BERT_ARCHS = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
GPT2_ARCHS = ("GPT2LMHeadModel", "GPT2Model")
SUPPORTED = f"supported: model_type 'bert' ({', '.join(BERT_ARCHS)}) and 'gpt2' ({', '.join(GPT2_ARCHS)})"


# ---- reading a directory ------------------------------------------------------------------------------
def is_hf_dir(path: str | Path) -> bool:
    """A transformers directory: config.json, and not an lmforge checkpoint (config.yaml)."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such directory")
    if not (d / "config.json").is_file():
        raise CheckpointError(f"{d}: not a transformers directory (no config.json)")
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{d / 'config.json'}: expected a JSON object")
    return cfg


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, as stored (safetensors preferred; pickle only with weights_only)."""
    d = Path(directory)
    if (d / "model.safetensors").is_file():
        return load_tensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").is_file():
        index = read_json(d / "model.safetensors.index.json")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            state.update(load_tensors(d / shard))
        return state
    if (d / "pytorch_model.bin").is_file():
        try:
            state = torch_load(d / "pytorch_model.bin")
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"{d / 'pytorch_model.bin'}: not a plain tensor file ({str(e).splitlines()[0]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{d / 'pytorch_model.bin'}: expected a mapping of names to tensors")
        return state
    raise CheckpointError(f"{d}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def hf_arch(hf: dict[str, Any], where: str) -> tuple[str, str | None]:
    """(lmforge arch, transformers architecture or None when config.json does not say)."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    known = {"bert": BERT_ARCHS, "gpt2": GPT2_ARCHS}
    if model_type not in known:
        named = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise CheckpointError(f"{where}: {named} is not supported; {SUPPORTED}")
    if len(archs) > 1 or (archs and archs[0] not in known[model_type]):
        raise CheckpointError(f"{where}: architecture {', '.join(archs)} is not supported; {SUPPORTED}")
    return ("bert" if model_type == "bert" else "gpt"), (archs[0] if archs else None)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], optional: tuple[str, ...], where: str) -> list[str]:
    """Copy `state` into `model`; keys starting with an `optional` prefix may be absent (they keep their
    random init). Anything else missing, any unexpected key, any shape mismatch is a CheckpointError.
    Returns the missing optional keys."""
    own = model.state_dict()
    tied = {"cls.predictions.decoder.weight"} if "cls.predictions.decoder.weight" in own else set()
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        tied.add("lm_head.weight")
    missing = [k for k in own if k not in state and k not in tied]
    required = [k for k in missing if not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    if required or unexpected:
        parts = ([f"missing {len(required)} ({', '.join(required[:3])}{', ...' if len(required) > 3 else ''})"] if required else []) + \
                ([f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"] if unexpected else [])
        raise CheckpointError(f"{where}: weights do not match config.json: {'; '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where}: weight '{k}' has shape {tuple(v.shape)}, config.json implies {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    return missing


# ---- import -------------------------------------------------------------------------------------------------
def load_hf(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a local transformers directory (BERT family or GPT-2) as an lmforge model.

    Args:
        directory: holds config.json, the weights and the tokenizer files.
        device: where to put the model.

    Returns:
        (model in eval mode, Tokenizer, run config with `arch`, `model` and `interop` sections).
    """
    from lmforge.interop.hf_tokenizer import has_tokenizer, load_hf_tokenizer
    from lmforge.models import build_model

    d = Path(directory)
    hf = read_hf_config(d)
    where = str(d)
    arch, architecture = hf_arch(hf, where)
    try:
        values = bert_config_from_hf(hf, where) if arch == "bert" else gpt_config_from_hf(hf, where)
    except KeyError as e:
        raise CheckpointError(f"{where}: config.json lacks {e.args[0]!r}") from None
    if not has_tokenizer(d):
        raise CheckpointError(f"{where}: no tokenizer files (tokenizer.json, vocab.txt, or vocab.json + merges.txt)")
    try:
        with torch.random.fork_rng(devices=[]):  # heads absent from the checkpoint: the same init every time
            torch.manual_seed(0)
            model = build_model(arch, values)
    except LmforgeError as e:
        raise CheckpointError(f"{where}: config.json is not a valid {arch} model ({e})") from None
    hf_state = read_hf_weights(d)
    if arch == "bert":
        state = bert_state_from_hf(hf_state, where)
        missing = _load_strict(model, state, tuple(BERT_HEADS), where)
        random_init = sorted({name for p, name in BERT_HEADS.items() if any(k.startswith(p) for k in missing)})
        architecture = architecture or _bert_architecture_of(state)
    else:
        state = gpt_state_from_hf(hf_state, model.config.tie_embeddings, where)
        missing = _load_strict(model, state, (), where)
        random_init = []
        architecture = architecture or ("GPT2LMHeadModel" if "lm_head.weight" in hf_state or any(
            k.startswith("transformer.") for k in hf_state) else "GPT2Model")
    tokenizer = load_hf_tokenizer(d)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size} embeddings")
    interop = {"source": str(d.resolve()), "hf_architecture": architecture, "random_init": random_init}
    st = d / "sentence_bert_config.json"
    if st.is_file():  # sentence-transformers' own truncation length
        interop["max_seq_length"] = int(read_json(st).get("max_seq_length", values.get("max_position", 512)))
    config = {"name": d.name, "arch": arch, "model": to_dict(model.config), "interop": interop}
    return model.to(device).eval(), tokenizer, config


def _bert_architecture_of(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("cls.seq_relationship.") for k in state):
        return "BertForPreTraining"
    return "BertForMaskedLM" if any(k.startswith("cls.predictions.") for k in state) else "BertModel"


# ---- export -------------------------------------------------------------------------------------------------
def default_architecture(arch: str, run_config: dict[str, Any] | None) -> str:
    """The transformers class that holds what this model actually learned."""
    if arch == "gpt":
        return "GPT2LMHeadModel"
    cfg = run_config or {}
    imported = (cfg.get("interop") or {}).get("hf_architecture")
    if imported in BERT_ARCHS:
        return imported
    return {"mlm": "BertForMaskedLM", "mlm+nsp": "BertForPreTraining", "simcse": "BertModel"}.get(
        cfg.get("objective"), "BertForPreTraining")


def export_hf(model: nn.Module, tokenizer: Any, out: str | Path, *, architecture: str | None = None,
              run_config: dict[str, Any] | None = None) -> Path:
    """Write `model` and `tokenizer` as a transformers directory (atomically).

    Args:
        model: an lmforge GPT (-> GPT2LMHeadModel) or post-LN Bert.
        tokenizer: its lmforge Tokenizer.
        out: the directory to write (replaced if it exists).
        architecture: BertModel, BertForMaskedLM or BertForPreTraining for a BERT; default: the one
            that holds what was trained (see `default_architecture`).
        run_config: the model's run config (to pick the default architecture).
    """
    from lmforge.interop.hf_tokenizer import save_hf_tokenizer
    from lmforge.models import arch_of

    model = unwrap(model)
    arch = arch_of(model)
    architecture = architecture or default_architecture(arch, run_config)
    if arch == "bert":
        if architecture not in BERT_ARCHS:
            raise CheckpointError(f"architecture {architecture!r} is not a BERT class; choose one of {', '.join(BERT_ARCHS)}")
        hf_cfg, state = bert_config_to_hf(model.config, architecture), bert_state_to_hf(model, architecture)
    elif arch == "gpt":
        if architecture != "GPT2LMHeadModel":
            raise CheckpointError(f"architecture {architecture!r}: a GPT exports as GPT2LMHeadModel")
        hf_cfg, state = gpt_config_to_hf(model.config, tokenizer.eos_id), gpt_state_to_hf(model)
    else:
        raise CheckpointError(f"a {arch} model has no transformers equivalent; {SUPPORTED}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    max_len = model.config.context_length
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu() for k, v in state.items()}
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", hf_cfg)
        save_tensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        save_hf_tokenizer(tokenizer, tmp, model_max_length=max_len)
    return Path(out)


# The one loader (`lmforge.checkpoints.load_model`) under the name earlier callers import.
load = load_model
