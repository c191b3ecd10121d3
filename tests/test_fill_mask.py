"""`lmforge fill_mask` against transformers' fill-mask pipeline on the same BERT weights, and its errors."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.recipes.fill_mask import fill_mask

transformers = pytest.importorskip("transformers")

WORDS = ("the a movie film was is very good bad great not really and it . , ! "
         "我 爱 北 京 天 安 门 好 ##s ##ing").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers BertForMaskedLM with a vocab.txt, saved as a directory."""
    d = tmp_path_factory.mktemp("bert_mlm")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # spread the predictions so that the top tokens are well separated
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(d)
    transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    return d


@pytest.mark.parametrize("text", ["the movie was [MASK] good .", "我爱北[MASK]天安门", "[MASK] film is [MASK] !"])
def test_equals_transformers_pipeline(hf_dir, text, capsys):
    pipe = transformers.pipeline("fill-mask", model=str(hf_dir), tokenizer=str(hf_dir), top_k=4, device="cpu")
    ref = pipe(text)
    ref = [ref] if isinstance(ref[0], dict) else ref  # one list per [MASK]
    ours = fill_mask(str(hf_dir), [text], top_k=4)[0]
    assert len(ours) == len(ref) == text.count("[MASK]")
    for mine, theirs in zip(ours, ref):
        assert [p["id"] for p in mine] == [p["token"] for p in theirs]
        assert [p["token"] for p in mine] == [p["token_str"] for p in theirs]
        torch.testing.assert_close(torch.tensor([p["score"] for p in mine]),
                                   torch.tensor([p["score"] for p in theirs]), atol=1e-5, rtol=1e-4)
    out = capsys.readouterr().out
    assert text in out and mine[0]["token"] in out


def test_errors(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="holds no \\[MASK\\]"):
        fill_mask(str(hf_dir), ["no mask here"])
    with pytest.raises(ConfigError, match="at most 16"):
        fill_mask(str(hf_dir), ["the " * 20 + "[MASK]"])
    with pytest.raises(ConfigError, match="top_k"):
        fill_mask(str(hf_dir), ["the [MASK]"], top_k=0)
    encoder_only = tmp_path / "encoder"
    transformers.BertModel.from_pretrained(hf_dir).save_pretrained(encoder_only)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        if (hf_dir / name).is_file():
            (encoder_only / name).write_bytes((hf_dir / name).read_bytes())
    with pytest.raises(ConfigError, match="no MLM head"):
        fill_mask(str(encoder_only), ["the [MASK]"])


def test_cli_one_line_error(hf_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lmforge", "fill_mask", str(hf_dir), "--text", "no mask"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no [MASK]" in proc.stderr
