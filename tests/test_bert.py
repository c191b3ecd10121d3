"""BERT against Hugging Face `transformers` (the reference for faithfulness), plus the pre-LN variant."""
import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.models import build_model
from lmforge.models.bert import Bert, BertConfig

transformers = pytest.importorskip("transformers")


TINY = dict(vocab_size=97, max_position=24, type_vocab_size=2, n_layer=2, n_head=4, d_model=32, d_ff=64)


def hf_pair(activation="gelu"):
    """A random HF BertForPreTraining and our Bert holding the same weights (copied by name)."""
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=24, type_vocab_size=2, hidden_act=activation,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    hf = transformers.BertForPreTraining(hf_cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases so that a swapped name would show
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    ours = Bert(BertConfig(**TINY, activation=activation)).eval()
    state = {k.removeprefix("bert."): v for k, v in hf.state_dict().items() if k != "cls.predictions.decoder.bias"}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing, missing
    assert all("position_ids" in k or "token_type_ids" in k for k in unexpected), unexpected
    return hf, ours


def batch_with_padding():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


def test_parity_with_transformers_pretraining_heads():
    hf, ours = hf_pair()
    ids, mask, types = batch_with_padding()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        out = ours(ids, attention_mask=mask, token_type_ids=types, nsp=True)
        logits_all = ours.mlm_logits(out.last_hidden_state)
    real = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], ref.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_all[real], ref.prediction_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    # The MLM head computed only at chosen positions (bool mask or flat indices) gives the same logits.
    pick = torch.zeros_like(real)
    pick[0, 3] = pick[1, 6] = pick[2, 1] = True
    flat = pick.flatten().nonzero().squeeze(1)
    torch.testing.assert_close(ours.mlm_logits(out.last_hidden_state, pick), ref.prediction_logits[pick], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(ids, mask, types, mlm_positions=flat).mlm_logits, ref.prediction_logits[pick], atol=1e-5, rtol=1e-5)


def test_parity_with_bertmodel_attentions_and_pooler():
    hf, ours = hf_pair()
    model = transformers.BertModel(hf.config, add_pooling_layer=True).eval()
    model.load_state_dict({k.removeprefix("bert."): v for k, v in hf.state_dict().items() if k.startswith("bert.")})
    model.config._attn_implementation = "eager"  # attention probabilities need the explicit path
    ids, mask, types = batch_with_padding()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
        out = ours(ids, attention_mask=mask, token_type_ids=types, output_attentions=True, nsp=True)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))
    assert (out.attentions[0][1, :, :, 7:] == 0).all()  # padding keys get no weight


def test_encode_equals_bertmodel_last_hidden_state():
    hf, ours = hf_pair()
    model = transformers.BertModel(hf.config, add_pooling_layer=True).eval()
    model.load_state_dict({k.removeprefix("bert."): v for k, v in hf.state_dict().items() if k.startswith("bert.")})
    ids, mask, types = batch_with_padding()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        hidden = ours.encode(ids, attention_mask=mask, token_type_ids=types)
        plain = ours.encode(ids)  # no mask, no segments: as transformers with its defaults
        ref_plain = model(input_ids=ids).last_hidden_state
    assert hidden.shape == (3, 11, 32)
    torch.testing.assert_close(hidden, ref, atol=1e-5, rtol=1e-5)  # padded positions too
    torch.testing.assert_close(plain, ref_plain, atol=1e-5, rtol=1e-5)


def test_encode_of_pre_ln_applies_the_final_layernorm():
    torch.manual_seed(0)
    model = Bert(BertConfig(**TINY, pre_ln=True)).eval()
    with torch.no_grad():
        model.encoder.LayerNorm.weight.fill_(2.0)
        model.encoder.LayerNorm.bias.fill_(0.5)
    ids, mask, types = batch_with_padding()
    with torch.no_grad():
        hidden = model.encode(ids, mask, types)
        x = model.embeddings(ids, types)
        for layer in model.encoder.layer:
            x, _ = layer(x, mask.bool()[:, None, None, :], False)
    # The final LayerNorm gives every row mean 0.5 and std 2 (its bias and weight).
    torch.testing.assert_close(hidden, model.encoder.LayerNorm(x))
    torch.testing.assert_close(hidden.mean(-1), torch.full((3, 11), 0.5), atol=1e-5, rtol=0)


def test_heads_run_only_when_asked():
    torch.manual_seed(0)
    model = Bert(BertConfig(**TINY)).eval()
    ids, mask, types = batch_with_padding()
    out = model(ids, mask, types)
    assert out.pooled is None and out.nsp_logits is None and out.mlm_logits is None
    hidden = model.encode(ids, mask, types)
    out = model(ids, mask, types, nsp=True, mlm_positions=torch.tensor([0, 12]))
    torch.testing.assert_close(out.last_hidden_state, hidden)
    torch.testing.assert_close(out.pooled, torch.tanh(model.pooler.dense(hidden[:, 0])))
    torch.testing.assert_close(out.nsp_logits, model.cls.seq_relationship(out.pooled))
    assert out.mlm_logits.shape == (2, 97)


@pytest.mark.parametrize("heads, trained", [
    ((), set()), (("mlm",), {"cls.predictions"}), (("pooler",), {"pooler"}),
    (("mlm", "nsp"), {"cls.predictions", "pooler", "cls.seq_relationship"})])
def test_use_heads_freezes_the_others_and_only_they_get_no_gradient(heads, trained):
    torch.manual_seed(0)
    model = Bert(BertConfig(**TINY)).use_heads(*heads)
    ids, mask, types = batch_with_padding()
    out = model(ids, mask, types, nsp="nsp" in heads, mlm_positions=torch.tensor([1, 2]) if "mlm" in heads else None)
    loss = out.last_hidden_state.sum()
    if "mlm" in heads:
        loss = loss + out.mlm_logits.sum()
    if "nsp" in heads:
        loss = loss + out.nsp_logits.sum()
    if heads == ("pooler",):
        loss = loss + model.pooler(out.last_hidden_state).sum()
    loss.backward()
    heads_of = ("pooler", "cls.predictions", "cls.seq_relationship")
    for name, p in model.named_parameters():
        head = next((h for h in heads_of if name.startswith(h + ".")), None)
        expect = head is None or head in trained  # the encoder (and the tied word embeddings) always train
        assert p.requires_grad == expect, name
        assert (p.grad is not None) == expect, name  # every trainable parameter gets a gradient (DDP's rule)
    # use_heads can be called again: the named heads train, the rest freeze
    model.use_heads("nsp")
    assert model.pooler.dense.weight.requires_grad and not model.cls.predictions.bias.requires_grad
    assert model.embeddings.word_embeddings.weight.requires_grad


def test_use_heads_rejects_an_unknown_head():
    with pytest.raises(ConfigError, match="unknown BERT head 'sop'; heads: pooler, mlm, nsp"):
        Bert(BertConfig(**TINY)).use_heads("mlm", "sop")


def test_context_length_names_max_position():
    cfg = BertConfig(**TINY)
    assert cfg.context_length == 24 and BertConfig.context_field == "max_position"
    with pytest.raises(AttributeError):
        cfg.context_length = 12  # read-only: set max_position


def test_tied_decoder_and_param_count():
    model = Bert(BertConfig(**TINY))
    assert model.cls.predictions.decoder.weight is model.embeddings.word_embeddings.weight
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n
    assert model.num_params(non_embedding=True) < n
    assert "BERT (post-LN)" in model.describe() and "2 layers" in model.describe()


def test_pre_ln_trains_on_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model("bert", dict(TINY, pre_ln=True, dropout=0.0, attn_dropout=0.0))
    assert model.encoder.LayerNorm is not None
    ids = torch.randint(5, 97, (4, 12))
    positions = torch.rand(4, 12) < 0.3
    positions[:, 0] = True
    targets = ids[positions]
    inputs = ids.masked_fill(positions, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(inputs, mlm_positions=positions.flatten().nonzero().squeeze(1))
        loss = F.cross_entropy(out.mlm_logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="n_head"):
        BertConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="model.n_layer"):
        BertConfig(n_layer=0)
    with pytest.raises(ConfigError, match="dropout"):
        BertConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="activation"):
        build_model("bert", {"activation": "swish"})
    with pytest.raises(ConfigError, match="max_position"):
        Bert(BertConfig(**TINY))(torch.zeros(1, 30, dtype=torch.long))


@pytest.mark.parametrize("name", ["bert_en_small", "bert_zh_small"])
def test_shipped_presets_parse_and_build(name):
    from lmforge.config import from_dict, load_yaml, preset_path
    from lmforge.recipes.pretrain import OBJECTIVES, DataConfig, resolve_model_config
    from lmforge.train.config import TrainConfig
    from lmforge.train.mlm import MLMOptions, NSPOptions

    cfg = load_yaml(preset_path(name))
    assert cfg["name"] == name and cfg["arch"] == "bert" and cfg["objective"] in OBJECTIVES
    data = from_dict(DataConfig, cfg["data"], "data")
    model_cfg, seq_len = resolve_model_config("bert", cfg["model"], 8000, data.seq_len)
    assert seq_len <= model_cfg.max_position
    assert build_model("bert", model_cfg).num_params() > 1e6
    from_dict(TrainConfig, cfg["train"], "train")
    from_dict(NSPOptions if cfg["objective"] == "mlm+nsp" else MLMOptions, cfg.get("objective_args"), "objective_args")


# ---- position='rope': rotary BERT against transformers' RoFormer -----------------------------------------
def _rotate_half_order(head_dim: int) -> torch.Tensor:
    """Our feature j of a head <- RoFormer's feature order[j]: we rotate the pairs (j, j + h/2) (the
    "rotate half" layout), RoFormer the pairs (2i, 2i + 1); both at frequency base^(-2i/h)."""
    half = head_dim // 2
    return torch.tensor([2 * j for j in range(half)] + [2 * j + 1 for j in range(half)])


def test_rope_bert_equals_roformer():
    """A post-LN BERT with position='rope' is RoFormer (no position table, rotary q/k) once each head's
    q/k features are reordered from RoFormer's interleaved pairs to our half-split pairs."""
    torch.manual_seed(0)
    n_head, d = 4, 32
    hf_cfg = transformers.RoFormerConfig(
        vocab_size=97, embedding_size=d, hidden_size=d, num_hidden_layers=2, num_attention_heads=n_head,
        intermediate_size=64, max_position_embeddings=24, type_vocab_size=2, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, rotary_value=False)
    hf = transformers.RoFormerModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    order = (torch.arange(n_head)[:, None] * (d // n_head) + _rotate_half_order(d // n_head)).flatten()
    state = {}
    for k, v in hf.state_dict().items():
        if "embed_positions" in k:
            continue
        if ".attention.self.query." in k or ".attention.self.key." in k:
            v = v[order]
        state[k] = v
    ours = Bert(BertConfig(**TINY, position="rope")).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("pooler.", "cls.")) for k in missing), missing
    ids, mask, types = batch_with_padding()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours.encode(ids, mask, types)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-4)


def test_rope_bert_has_no_position_table_and_is_shift_invariant():
    torch.manual_seed(0)
    model = Bert(BertConfig(**TINY, position="rope", dropout=0.0, attn_dropout=0.0)).eval()
    assert "embeddings.position_embeddings.weight" not in model.state_dict()
    assert model.num_params(non_embedding=True) == model.num_params() - 97 * 32 - 2 * 32
    assert "rope" in model.describe()
    learned = Bert(BertConfig(**TINY, dropout=0.0, attn_dropout=0.0)).eval()
    ids = torch.randint(5, 97, (1, 10))
    # padding on the left moves every real token by 3 positions: rotary attention only sees offsets
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(padded, mask)[:, 3:], model.encode(ids), atol=1e-5, rtol=0)
        assert (learned.encode(padded, mask)[:, 3:] - learned.encode(ids)).abs().max() > 1e-3


def test_rope_bert_config_errors_and_export_refused(tmp_path):
    from lmforge.errors import CheckpointError
    from lmforge.interop.hf_convert import bert_config_to_hf

    with pytest.raises(ConfigError, match="model.position must be 'learned' or 'rope', got 'alibi'"):
        BertConfig(**TINY, position="alibi")
    with pytest.raises(ConfigError, match="even head size"):
        BertConfig(**dict(TINY, d_model=36, n_head=4), position="rope")
    with pytest.raises(ConfigError, match="rope_base"):
        BertConfig(**TINY, position="rope", rope_base=0)
    with pytest.raises(CheckpointError, match="position='rope' has no transformers BERT equivalent"):
        bert_config_to_hf(BertConfig(**TINY, position="rope"), "BertForMaskedLM")
