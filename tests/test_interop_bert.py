"""BERT-family transformers directories in and out, with `transformers` as the reference: outputs,
tokenizer ids, loading without missing/unexpected weights, and one-line errors for bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.checkpoints import load_model, load_pretrained
from lmforge.interop.hf import export_hf, load_hf
from lmforge.interop.hf_tokenizer import load_hf_tokenizer
from lmforge.models.bert import Bert, BertConfig
from helpers import transformers_warnings

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)
WORDS = ("the a an is was of and to in it hello world quick brown fox jump ##s ##ed ##ing dog lazy over "
         "un ##believ ##able token ##izer , . ! ? 北 京 是 中 国 的 首 都 我 爱 你 好").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
TEXTS = ["Hello world, the quick brown fox jumps over the lazy dog!", "Unbelievable tokenizer.",
         "北京是中国的首都。我爱你！", "hello 你好 world [MASK] zzz"]
HF_TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=24, type_vocab_size=2,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
OURS_TINY = dict(vocab_size=len(VOCAB), max_position=24, n_layer=2, n_head=4, d_model=32, d_ff=48,
                 dropout=0.0, attn_dropout=0.0)




def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorms and biases, so that a swapped or dropped name shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(VOCAB), (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


def write_vocab(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Random tiny HF BERTs saved by transformers (one per class), with a BertTokenizer."""
    root = tmp_path_factory.mktemp("hf_bert")
    write_vocab(root / "vocab")
    hf_tok = transformers.BertTokenizer(vocab_file=str(root / "vocab" / "vocab.txt"))
    out = {}
    for i, cls in enumerate(("BertForPreTraining", "BertForMaskedLM", "BertModel")):
        torch.manual_seed(i)
        model = getattr(transformers, cls)(transformers.BertConfig(**HF_TINY)).eval()
        perturb(model, i)
        model.save_pretrained(root / cls)
        hf_tok.save_pretrained(root / cls)
        out[cls] = root / cls
    return out


def hf_outputs(model, ids, mask, types):
    with torch.no_grad():
        if isinstance(model, transformers.BertModel):
            o = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            return o.last_hidden_state, o.pooler_output, None, None
        o = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        nsp = getattr(o, "seq_relationship_logits", None)
        logits = o.prediction_logits if hasattr(o, "prediction_logits") else o.logits
        return o.hidden_states[-1], None, logits, nsp


# ---- transformers -> lmforge ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["BertForPreTraining", "BertForMaskedLM", "BertModel"])
def test_import_matches_transformers(hf_dirs, cls):
    ref = getattr(transformers, cls).from_pretrained(hf_dirs[cls]).eval()
    model, tok, cfg = load_hf(hf_dirs[cls])
    ids, mask, types = padded_batch()
    hidden, pooled, logits, nsp = hf_outputs(ref, ids, mask, types)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, token_type_ids=types, nsp=True)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], hidden[real], **TOL)
    torch.testing.assert_close(out.last_hidden_state, hidden, **TOL)  # padded positions too
    if pooled is not None:
        torch.testing.assert_close(out.pooled, pooled, **TOL)
    if logits is not None:
        torch.testing.assert_close(model.mlm_logits(out.last_hidden_state)[real], logits[real], **TOL)
    if nsp is not None:
        torch.testing.assert_close(out.nsp_logits, nsp, **TOL)
    assert cfg["arch"] == "bert" and cfg["interop"]["hf_architecture"] == cls
    expected_random = {"BertForPreTraining": [], "BertForMaskedLM": ["NSP head", "pooler"],
                       "BertModel": ["MLM head", "NSP head"]}[cls]
    assert cfg["interop"]["random_init"] == expected_random
    assert not model.training


def test_import_pytorch_model_bin(hf_dirs, tmp_path):
    """pytorch_model.bin (read with weights_only=True) and TF-style LayerNorm gamma/beta names."""
    src = hf_dirs["BertForMaskedLM"]
    d = tmp_path / "bin"
    shutil.copytree(src, d)
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in state.items()}
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    a, _, _ = load_hf(src)
    b, _, _ = load_hf(d)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# ---- lmforge -> transformers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(3)
    model = Bert(BertConfig(**OURS_TINY, activation="gelu")).eval()
    perturb(model, 3)
    return model


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    d = tmp_path_factory.mktemp("wp")
    write_vocab(d)
    return load_hf_tokenizer(d)


@pytest.mark.parametrize("cls,auto", [("BertForPreTraining", "AutoModelForPreTraining"),
                                      ("BertForMaskedLM", "AutoModelForMaskedLM"),
                                      ("BertModel", "AutoModel")])
def test_export_loads_cleanly_and_matches(ours, wordpiece, tmp_path, cls, auto):
    out = export_hf(ours, wordpiece, tmp_path / "hf", architecture=cls)
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls]
    with transformers_warnings() as warned:
        ref, info = getattr(transformers, auto).from_pretrained(out, output_loading_info=True)
    assert type(ref).__name__ == cls
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not warned, warned
    ids, mask, types = padded_batch()
    hidden, pooled, logits, nsp = hf_outputs(ref.eval(), ids, mask, types)
    with torch.no_grad():
        o = ours(ids, attention_mask=mask, token_type_ids=types, nsp=True)
    torch.testing.assert_close(hidden, o.last_hidden_state, **TOL)
    if pooled is not None:
        torch.testing.assert_close(pooled, o.pooled, **TOL)
    if logits is not None:
        torch.testing.assert_close(logits, ours.mlm_logits(o.last_hidden_state), **TOL)
    if nsp is not None:
        torch.testing.assert_close(nsp, o.nsp_logits, **TOL)


@pytest.mark.parametrize("activation,hf_act", [("gelu_tanh", "gelu_new"), ("relu", "relu")])
def test_export_activations(wordpiece, tmp_path, activation, hf_act):
    torch.manual_seed(0)
    model = Bert(BertConfig(**OURS_TINY, activation=activation)).eval()
    out = export_hf(model, wordpiece, tmp_path / "hf", architecture="BertForMaskedLM")
    assert json.loads((out / "config.json").read_text())["hidden_act"] == hf_act
    ref = transformers.BertForMaskedLM.from_pretrained(out).eval()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits,
                                   model.mlm_logits(model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state),
                                   **TOL)


def test_round_trip_through_cli(hf_dirs, tmp_path, capsys):
    """`lmforge import DIR --out CKPT`, `lmforge export CKPT --format hf OUT`: same weights, same class."""
    src = hf_dirs["BertForPreTraining"]
    assert main(["import", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    assert "imported BertForPreTraining" in capsys.readouterr().out
    model, tok, cfg = load_pretrained(tmp_path / "ckpt")
    assert cfg["interop"]["hf_architecture"] == "BertForPreTraining"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    back, _, _ = load_model(tmp_path / "back")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    import lmforge

    again, _, _ = lmforge.load_model(tmp_path / "ckpt")  # an lmforge checkpoint through the same entry point
    assert torch.equal(again.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


def test_export_default_architecture_follows_objective(ours, wordpiece, tmp_path):
    from lmforge.interop.hf import default_architecture

    assert default_architecture("bert", {"objective": "mlm"}) == "BertForMaskedLM"
    assert default_architecture("bert", {"objective": "mlm+nsp"}) == "BertForPreTraining"
    assert default_architecture("bert", {"interop": {"hf_architecture": "BertModel"}}) == "BertModel"
    out = export_hf(ours, wordpiece, tmp_path / "hf", run_config={"objective": "mlm"})
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]


def test_export_pre_ln_is_refused(wordpiece, tmp_path):
    model = Bert(BertConfig(**OURS_TINY, pre_ln=True))
    with pytest.raises(CheckpointError, match="pre-LN"):
        export_hf(model, wordpiece, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ---- tokenizers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("files", ["vocab.txt", "tokenizer.json"])
def test_tokenizer_ids_match_transformers(hf_dirs, tmp_path, files):
    d = tmp_path / "tok"
    shutil.copytree(hf_dirs["BertModel"], d)
    if files == "vocab.txt":  # BERT as older tools save it: vocab.txt + tokenizer_config.json only
        (d / "tokenizer.json").unlink()
        write_vocab(d)
    else:
        assert (d / "tokenizer.json").is_file()
    ours_tok = load_hf_tokenizer(d)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        assert ours_tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
    ids, types = ours_tok.encode_pair(TEXTS[0], TEXTS[2])
    r = ref(TEXTS[0], TEXTS[2])
    assert (ids, types) == (r["input_ids"], r["token_type_ids"])


@pytest.mark.parametrize("lowercase", [True, False])
def test_exported_lmforge_wordpiece_matches_transformers(tmp_path, lowercase):
    """A WordPiece trained by lmforge, exported: AutoTokenizer gives our ids (English and Chinese)."""
    from lmforge.text.tokenizer import train_tokenizer

    corpus = ["Hello World, the Quick brown fox jumps over the lazy dog.", "北京是中国的首都。我爱北京天安门。"] * 20
    tok = train_tokenizer(corpus, kind="wordpiece", vocab_size=120, min_frequency=1, lowercase=lowercase)
    model = Bert(BertConfig(**{**OURS_TINY, "vocab_size": tok.vocab_size}))
    out = export_hf(model, tok, tmp_path / "hf")
    ref = transformers.AutoTokenizer.from_pretrained(out)
    for text in corpus[:2] + ["The QUICK fox 首都 xyzzy"]:
        assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
    assert load_hf_tokenizer(out).encode(corpus[1]) == tok.encode(corpus[1])


# ---- bad inputs -----------------------------------------------------------------------------------------------
def edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_inputs_are_checkpoint_errors(hf_dirs, tmp_path):
    src = hf_dirs["BertForMaskedLM"]
    cases = [
        (tmp_path / "nope", "no such directory"),
        (tmp_path, "no config.json"),
        (edit_config(src, tmp_path / "roberta", model_type="roberta", architectures=["RobertaForMaskedLM"]),
         "model_type 'roberta'.*not supported; supported: model_type 'bert'"),
        (edit_config(src, tmp_path / "cls", architectures=["BertForSequenceClassification"]),
         "architecture BertForSequenceClassification is not supported"),
        (edit_config(src, tmp_path / "rel", position_embedding_type="relative_key"), "position_embedding_type='relative_key'"),
        (edit_config(src, tmp_path / "act", hidden_act="silu"), "activation 'silu' is not supported"),
        (edit_config(src, tmp_path / "wide", hidden_size=64), "weight .* has shape"),
        (edit_config(src, tmp_path / "deep", num_hidden_layers=3), "missing 16 \\(encoder.layer.2"),
        (edit_config(src, tmp_path / "heads", num_attention_heads=5), "not a valid bert model"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_hf(path)
    no_weights = tmp_path / "noweights"
    shutil.copytree(src, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_hf(no_weights)


def test_cli_errors_are_one_line(hf_dirs, tmp_path, capsys):
    d = edit_config(hf_dirs["BertModel"], tmp_path / "x", model_type="t5", architectures=["T5Model"])
    assert main(["import", str(d), "--out", str(tmp_path / "ckpt")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "model_type 't5' (T5Model) is not supported" in err[0], err
    assert not (tmp_path / "ckpt").exists()


# ---- one loader for every kind of model --------------------------------------------------------------------
def test_load_model_reads_every_kind(hf_dirs, tmp_path):
    """A transformers directory, an lmforge checkpoint, a run directory (its newest complete checkpoint) and a
    fine-tuned checkpoint (its backbone, the task head left out) all come back through `load_model`."""
    import lmforge
    from lmforge.config import load_yaml, save_yaml
    from lmforge.storage import load_tensors, save_tensors
    from lmforge.train.checkpoint import save_checkpoint

    model, tok, cfg = load_model(hf_dirs["BertForPreTraining"])
    assert cfg["interop"]["hf_architecture"] == "BertForPreTraining" and not model.training
    save_checkpoint(tmp_path / "ckpt", model=model, config=cfg, tokenizer=tok)
    for step in (2, 4):
        save_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{step}", model=model, config=dict(cfg, step=step),
                        tokenizer=tok)
    # a fine-tuned checkpoint: the backbone under its base names, the head beside it, a `task` section
    (tmp_path / "tuned").mkdir()
    shutil.copy(tmp_path / "ckpt" / "tokenizer.json", tmp_path / "tuned")
    state = dict(load_tensors(tmp_path / "ckpt" / "model.safetensors"))
    state.update({"head.classifier.weight": torch.ones(3, 32), "head.classifier.bias": torch.zeros(3)})
    save_tensors(state, tmp_path / "tuned" / "model.safetensors")
    save_yaml({**load_yaml(tmp_path / "ckpt" / "config.yaml"), "task": {"name": "classify", "labels": ["a", "b", "c"]}},
              tmp_path / "tuned" / "config.yaml")

    for path, step in ((tmp_path / "ckpt", None), (tmp_path / "run", 4), (tmp_path / "tuned", None)):
        got, got_tok, got_cfg = lmforge.load_model(path)
        assert type(got) is Bert and got_tok.hash == tok.hash and got_cfg.get("step") == step
        for (k, a), (_, b) in zip(model.state_dict().items(), got.state_dict().items()):
            assert torch.equal(a, b), (path, k)
    with pytest.raises(CheckpointError, match="nowhere: no such directory .* a named source: minilm-l6"):
        load_model(tmp_path / "nowhere")
    save_yaml({**load_yaml(tmp_path / "ckpt" / "config.yaml")}, tmp_path / "tuned" / "config.yaml")  # no task section
    with pytest.raises(CheckpointError, match="unexpected.*head.classifier"):
        load_model(tmp_path / "tuned")


def test_interop_and_the_loader_do_not_import_training():
    import subprocess
    import sys

    code = ("import sys, lmforge.interop.hf, lmforge.checkpoints, lmforge.recipes.embed, lmforge.recipes.attention, "
            "lmforge.recipes.fill_mask, lmforge.recipes.generate; "
            "print(sorted(m for m in sys.modules if m.startswith('lmforge.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
