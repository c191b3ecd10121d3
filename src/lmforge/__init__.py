"""lmforge: from raw text to a pretrained, fine-tuned, evaluated and served language model."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer, run config) from an lmforge run or checkpoint directory, a Hugging
    Face transformers directory, or a named source (`minilm-l6`): the one loader every verb uses
    (`lmforge.checkpoints.load_model`). Imports torch on first call only."""
    from lmforge.checkpoints import load_model as _load_model

    return _load_model(path, device)


load = load_model  # the earlier name
