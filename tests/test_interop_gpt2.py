"""GPT-2 transformers directories in and out, with `transformers` as the reference: logits with padding,
greedy generation token for token, byte-level BPE ids, clean loading of exports, errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.generation import generate
from lmforge.interop.hf import export_hf, load_hf
from lmforge.interop.hf_tokenizer import load_hf_tokenizer
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.text.tokenizer import train_tokenizer
from helpers import transformers_warnings

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)
CORPUS = ["The quick brown fox jumps over the lazy dog. Hello world!",
          "北京是中国的首都。我爱北京天安门。", "def main():\n    return 42  # code, too"] * 10
TEXTS = ["Hello world, the quick fox!", "北京是中国的首都。", "  spaces\tand\nnewlines <|endoftext|> end", "naïve café 🙂"]




def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe):
    """A random tiny GPT2LMHeadModel saved by transformers, with a GPT2Tokenizer built from the
    vocab.json + merges.txt of a BPE we trained."""
    root = tmp_path_factory.mktemp("hf_gpt2")
    (root / "slow").mkdir()
    bpe.backend.model.save(str(root / "slow"))
    eos = bpe.eos_id
    hf_tok = transformers.GPT2Tokenizer.from_pretrained(root / "slow")  # reads vocab.json + merges.txt
    assert len(hf_tok) == bpe.vocab_size and hf_tok(CORPUS[0])["input_ids"] == bpe.encode(CORPUS[0])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    perturb(model)
    model.save_pretrained(root / "model")
    hf_tok.save_pretrained(root / "model")
    return root


def prompts():
    return [[5, 17, 40, 99, 3, 250], [7, 8], [120, 121, 122, 9]]


def left_pad(rows, pad):
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# ---- transformers -> lmforge ---------------------------------------------------------------------------
def test_import_logits_match_with_padding(hf_dir):
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir / "model").eval()
    model, tok, cfg = load_hf(hf_dir / "model")
    assert cfg["arch"] == "gpt" and cfg["interop"] == {**cfg["interop"], "hf_architecture": "GPT2LMHeadModel",
                                                       "random_init": []}
    ids, mask = left_pad(prompts(), tok.eos_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = model(ids, attention_mask=mask)  # ours counts positions from the mask itself
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], **TOL)
    right = torch.flip(ids, [1]), torch.flip(mask, [1])  # right padding: default positions agree
    with torch.no_grad():
        torch.testing.assert_close(model(right[0], attention_mask=right[1])[right[1].bool()],
                                   ref(input_ids=right[0], attention_mask=right[1]).logits[right[1].bool()], **TOL)


def test_greedy_generation_matches_transformers(hf_dir):
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir / "model").eval()
    model, tok, _ = load_hf(hf_dir / "model")
    eos = tok.eos_id
    ours = generate(model, prompts(), max_new_tokens=12, eos_token_id=eos, pad_token_id=eos)
    ids, mask = left_pad(prompts(), eos)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                           eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:].tolist()
    theirs = [row[: row.index(eos)] if eos in row else row for row in out]
    assert ours == theirs
    for p, expected in zip(prompts(), theirs):  # one prompt at a time too (no padding)
        assert generate(model, [p], max_new_tokens=12, eos_token_id=eos) == [expected]


def test_import_gpt2model_without_head(hf_dir, tmp_path):
    """A GPT2Model checkpoint (no `transformer.` prefix, no lm_head): the tied head needs nothing more."""
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir / "model")
    ref.transformer.save_pretrained(tmp_path / "base")
    shutil.copy(hf_dir / "model" / "tokenizer.json", tmp_path / "base")
    model, _, cfg = load_hf(tmp_path / "base")
    assert cfg["interop"]["hf_architecture"] == "GPT2Model"
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, **TOL)


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab.json+merges.txt"])
def test_bpe_ids_match_transformers(hf_dir, tmp_path, files):
    d = tmp_path / "tok"
    shutil.copytree(hf_dir / "model", d)
    if files != "tokenizer.json":
        (d / "tokenizer.json").unlink()
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(hf_dir / "slow" / f, d / f)
    ours = load_hf_tokenizer(d)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    for text in TEXTS + CORPUS[:3]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"] and len(ids) >= 3, text
        assert ours.decode(ids) == text


# ---- lmforge -> transformers ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"bias": False}, {"tie_embeddings": False, "activation": "gelu"}])
def test_export_loads_cleanly_and_matches(bpe, tmp_path, variant):
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=320, block_size=40, n_layer=2, n_head=4, d_model=32, d_ff=40, **variant)).eval()
    perturb(model, 1)
    out = export_hf(model, bpe, tmp_path / "hf")
    with transformers_warnings() as warned:
        ref, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(ref).__name__ == "GPT2LMHeadModel"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not warned, warned
    ids, mask = left_pad(prompts(), bpe.eos_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = ref.eval()(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = model(ids, attention_mask=mask)
    torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], **TOL)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == bpe.encode(text), text
    back, tok, _ = load_hf(out)  # and back again: the same model
    with torch.no_grad():
        torch.testing.assert_close(back(ids, attention_mask=mask), ours, atol=0, rtol=0)
    assert tok.to_str() == bpe.to_str()


def test_export_char_tokenizer(tmp_path):
    """A char tokenizer has no GPT-2 class: it goes out as the generic fast tokenizer, same ids."""
    tok = train_tokenizer(["hello world\nfoo bar!"], kind="char")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    out = export_hf(model, tok, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None
    assert transformers.AutoTokenizer.from_pretrained(out)("hello\nbar")["input_ids"] == tok.encode("hello\nbar")


def test_export_rope_is_refused(bpe, tmp_path):
    model = GPT(GPTConfig(vocab_size=320, block_size=40, n_layer=1, n_head=2, d_model=16, position="rope"))
    with pytest.raises(CheckpointError, match="position='rope' has no GPT-2 equivalent"):
        export_hf(model, bpe, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---- bad inputs --------------------------------------------------------------------------------------------
def test_bad_configs(hf_dir, tmp_path):
    def edited(name, **changes):
        d = tmp_path / name
        shutil.copytree(hf_dir / "model", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    for d, message in [
        (edited("act", activation_function="swish"), "activation 'swish' is not supported"),
        (edited("scale", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
        (edited("llama", model_type="llama", architectures=["LlamaForCausalLM"]), "model_type 'llama'"),
        (edited("vocab", vocab_size=100), "tokenizer has 300 tokens|shape"),
        (edited("embd", n_embd=48), "shape"),
        (edited("untied", tie_word_embeddings=False), "missing 1 \\(lm_head.weight\\)"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_hf(d)
