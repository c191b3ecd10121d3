"""`lmforge attention`: a heatmap of a model's attention weights over one sentence.

Runs the model (BERT: `[CLS] text [SEP]`; GPT: the text's tokens) with `output_attentions=True`, takes
one layer's (n_head, T, T) attention probabilities, one head or their mean over heads, and draws it with
the tokens on both axes (row = the attending token, column = the attended one; every row sums to 1).

Chinese labels need a CJK font: one is looked up with `fc-list :lang=zh` and among matplotlib's fonts. When
none is installed the characters the default font cannot draw are written as code points (`我` ->
`U+6211`, labels `id:U+6211`) after one warning, so the PNG is still readable.
"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import ConfigError, DataError

DPI = 100
_KNOWN_CJK = ("Noto Sans CJK SC", "Noto Sans SC", "Noto Serif CJK SC", "Source Han Sans SC", "Source Han Sans CN",
              "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC",
              "AR PL UMing CN", "AR PL UKai CN", "Droid Sans Fallback")


def figure_size(n_tokens: int) -> tuple[float, float]:
    """(width, height) in inches: grows with the number of tokens, room on the right for the colorbar."""
    side = min(3.0 + 0.32 * n_tokens, 18.0)
    return side + 1.5, side


def _tokens(net, tokenizer, text: str, arch: str) -> list[int]:
    """BERT: `[CLS] text [SEP]` from the tokenizer's template, cut to the context; GPT: the text's tokens."""
    if arch == "bert":
        if tokenizer.cls_id is None or tokenizer.sep_id is None:
            raise ConfigError("a BERT model needs a tokenizer with [CLS] and [SEP]")
        limit = net.config.context_length
    else:
        limit = getattr(net, "max_seq_len", None)  # None: no fixed context (rope)
    return tokenizer.encode_for_model([text], max_length=limit, padding=False,
                                      add_special_tokens=arch == "bert")["input_ids"][0]


def _label(tokenizer, i: int) -> str:
    """A readable token string: the vocabulary entry, or for byte-level BPE the decoded text."""
    tok = tokenizer.id_to_token(i) or f"<{i}>"
    if tokenizer.kind == "bpe":
        text = tokenizer.decode([i])
        if text and "\ufffd" not in text:  # a whole character (not part of a multi-byte one)
            tok = text
    return tok.replace("\n", "\\n").replace(" ", "␣") or f"<{i}>"


def attention_matrix(net, tokenizer, text: str, *, layer: int = -1, head: int | None = None,
                     arch: str | None = None) -> tuple[np.ndarray, list[str], str]:
    """(T, T) attention probabilities of `text` at `layer`, for one `head` or averaged over heads
    (head=None), with the token labels and a title. Rows are queries; each sums to 1.

    Args:
        net: a Bert or GPT (eval mode).
        tokenizer: its tokenizer.
        text: the sentence.
        layer: layer index, negative counts from the end (-1 = last).
        head: head index (negative counts from the end), or None for the mean over heads.
        arch: 'bert' or 'gpt' (default: looked up in the model registry).
    """
    from lmforge.models import arch_of

    arch = arch or arch_of(net)
    if arch not in ("bert", "gpt"):
        raise ConfigError(f"attention maps need a Transformer (bert or gpt); a {arch} model has no attention")
    if not text.strip():
        raise DataError("text is empty")
    ids = _tokens(net, tokenizer, text, arch)
    if not ids:
        raise DataError(f"text {text!r} encodes to no tokens")
    device = next(net.parameters()).device
    with torch.no_grad():
        out = net(torch.tensor([ids], device=device), output_attentions=True)
    attentions = out.attentions if arch == "bert" else out[1]  # per layer (1, n_head, T, T)
    n_layer = len(attentions)
    if not -n_layer <= layer < n_layer:
        raise ConfigError(f"layer {layer} out of range: the model has {n_layer} layers (0..{n_layer - 1}, or -1 for the last)")
    weights = attentions[layer][0].float().cpu()  # (n_head, T, T)
    n_head = weights.size(0)
    layer_no = layer % n_layer
    if head is None:
        matrix, what = weights.mean(0), f"mean of {n_head} heads"
    else:
        if not -n_head <= head < n_head:
            raise ConfigError(f"head {head} out of range: layer {layer_no} has {n_head} heads (0..{n_head - 1}, or all)")
        matrix, what = weights[head], f"head {head % n_head}"
    labels = [_label(tokenizer, i) for i in ids]
    return matrix.numpy(), labels, f"{arch} attention: layer {layer_no} of {n_layer}, {what}"


def _find_cjk_font() -> str | None:
    """A font family that can draw Chinese: fontconfig's answer first, then well-known names."""
    from matplotlib import font_manager

    try:
        listed = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    families = [ln.split(",")[0].strip() for ln in listed.splitlines() if ln.strip()]
    available = {f.name for f in font_manager.fontManager.ttflist}
    return next((f for f in [*families, *_KNOWN_CJK] if f in available), None)


def _drawable(labels: list[str], ids: list[int] | None) -> tuple[list[str], bool]:
    """Labels with characters the default font lacks written as U+XXXX (and 'id:' in front); whether any were."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    charmap = FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap()
    out, changed = [], False
    for k, label in enumerate(labels):
        if all(ord(ch) in charmap for ch in label):
            out.append(label)
            continue
        changed = True
        text = "".join(ch if ord(ch) in charmap else f"U+{ord(ch):04X}" for ch in label)
        out.append(f"{ids[k]}:{text}" if ids is not None else text)
    return out, changed


def plot_attention(matrix: np.ndarray, labels: list[str], title: str, out: str | Path,
                   ids: list[int] | None = None) -> Path:
    """Draw `matrix` (T, T) as a heatmap with `labels` on both axes and a colorbar; write it atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.storage import atomic_write_bytes

    n = len(labels)
    font = _find_cjk_font() if any(ord(ch) > 0x2E7F for label in labels for ch in label) else None
    if font is None:
        labels, changed = _drawable(labels, ids)
        if changed:
            print("lmforge attention: warning: no CJK-capable font found (`fc-list :lang=zh` lists none); "
                  "characters the default font cannot draw are labelled by code point (install e.g. fonts-noto-cjk)",
                  file=sys.stderr)
    families = [font, "DejaVu Sans"] if font else ["DejaVu Sans"]
    fontsize = max(5.0, min(11.0, 260.0 / max(n, 1)))
    with matplotlib.rc_context({"font.family": families}):
        fig, ax = plt.subplots(figsize=figure_size(n), dpi=DPI)
        im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=float(matrix.max()) or 1.0, aspect="equal")
        ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(n), labels, fontsize=fontsize)
        ax.set_xlabel("attended token (key)")
        ax.set_ylabel("attending token (query)")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=Path(out).suffix.lstrip(".") or "png", dpi=DPI)
        plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def attention(model: str, text: str, layer: int = -1, head: str = "all", out: str = "attention.png",
              device: str = "cpu", overwrite: bool = False) -> dict:
    """Plot a heatmap of a model's attention weights over a sentence.

    Args:
        model: an lmforge run or checkpoint directory (bert or gpt), a transformers directory, or a named source.
        text: the sentence, e.g. "我爱学习编程".
        layer: which layer (0-based; negative counts from the end, -1 = the last).
        head: a head index, or 'all' for the mean over the layer's heads.
        out: the image file to write (.png; .svg and .pdf work too).
        device: cpu, cuda, ...
        overwrite: replace an existing OUT file.
    """
    from lmforge.checkpoints import load_model
    from lmforge.storage import check_output
    from lmforge.train.config import check_device

    if Path(out).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"out: {out} must end in .png (or .svg, .pdf)")
    check_output(out, overwrite=overwrite)
    check_device(device, "device")
    if head == "all":
        head_index = None
    else:
        try:
            head_index = int(head)
        except ValueError:
            raise ConfigError(f"head must be a head index or 'all', got {head!r}") from None
    net, tokenizer, cfg = load_model(model, device)
    matrix, labels, title = attention_matrix(net, tokenizer, text, layer=layer, head=head_index, arch=cfg.get("arch"))
    ids = _tokens(net, tokenizer, text, cfg.get("arch"))
    path = plot_attention(matrix, labels, title, out, ids=ids)
    print(f"{title}; {len(labels)} tokens -> {path}")
    return {"out": str(path), "tokens": labels, "title": title}
