"""lmforge: from raw text to a pretrained, fine-tuned, evaluated and served language model."""

__version__ = "0.1.0"
