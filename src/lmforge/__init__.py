"""lmforge: from raw text to a pretrained, fine-tuned, evaluated and served language model."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """(model in eval mode, tokenizer, run config) from a Hugging Face transformers directory, a named
    source (`minilm-l6`), or an lmforge run or checkpoint directory. Imports torch on first call only."""
    from lmforge.interop.hf import load as _load

    return _load(path, device)
