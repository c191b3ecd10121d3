"""GPT: architecture parity with transformers' GPT2LMHeadModel, causality, KV cache == recomputation,
rotary embeddings against Llama's, init statistics, parameter counts, config errors."""
import math

import pytest
import torch

from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.models import build_model
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.layers import apply_rope, rope_angles

TINY = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, d_model=32)



def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


def hf_gpt2(vocab=61, n_positions=32, n_layer=2, n_head=4, d_model=32, seed=0):
    """A random tiny GPT2LMHeadModel with every parameter perturbed (LayerNorms included)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=d_model, n_layer=n_layer,
                                  n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  layer_norm_epsilon=1e-5, activation_function="gelu_new",
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return hf


def from_hf(hf) -> GPT:
    """Our GPT with the HF model's weights (HF's Conv1D stores Linear weights transposed)."""
    c = hf.config
    ours = GPT(GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                         d_model=c.n_embd, layer_norm_eps=c.layer_norm_epsilon)).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(conv1d) else v) for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not missing, missing
    assert all(k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") for k in unexpected), unexpected
    return ours


def test_parity_with_transformers_gpt2():
    hf = hf_gpt2()
    ours = from_hf(hf)
    ids = torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_encode_equals_gpt2model_last_hidden_state():
    transformers = pytest.importorskip("transformers")
    hf = hf_gpt2()
    ours = from_hf(hf)
    base = transformers.GPT2Model(hf.config).eval()
    base.load_state_dict({k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
                          if k.startswith("transformer.")})
    ids = torch.randint(1, 61, (3, 13), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as task batches are padded
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        hidden = ours.encode(ids)
        torch.testing.assert_close(hidden, base(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
        masked = ours.encode(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        ref = base(ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (3, 13, 32)
    real = mask.bool()
    torch.testing.assert_close(masked[real], ref[real], atol=1e-5, rtol=1e-5)
    # encode is what the LM head reads: logits = lm_head(encode(x))
    torch.testing.assert_close(ours.lm_head(hidden), ours(ids), atol=1e-6, rtol=1e-6)


def test_use_heads_freezes_an_untied_lm_head_only():
    tied = tiny().use_heads()
    assert all(p.requires_grad for p in tied.parameters())  # the head is the token embedding: it trains
    untied = tiny(tie_embeddings=False).use_heads()
    untied.encode(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert not untied.lm_head.weight.requires_grad
    assert all(p.grad is not None for p in untied.parameters() if p.requires_grad)
    assert untied.use_heads("lm").lm_head.weight.requires_grad
    with pytest.raises(ConfigError, match="unknown GPT head 'mlm'"):
        untied.use_heads("mlm")


def test_context_length_names_block_size():
    cfg = GPTConfig(**TINY)
    assert cfg.context_length == 32 and GPTConfig.context_field == "block_size"
    with pytest.raises(AttributeError):
        cfg.context_length = 8


def test_parity_with_transformers_gpt2_left_padding():
    hf = hf_gpt2()
    ours = from_hf(hf)
    ids = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=position_ids).logits
        mine = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(mine[real], theirs[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_causality(position):
    model = tiny(position=position)
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 7, 19):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % 61
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
            assert not torch.allclose(out[:, t], base[:, t])  # the change is visible from t on


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_equals_full_recomputation(position):
    model = tiny(position=position)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        prefill = model(ids[:, :5], cache=cache)  # a prompt of 5, then one token at a time
        torch.testing.assert_close(prefill, full[:, :5], atol=1e-5, rtol=0)
        for t in range(5, 16):
            step = model(ids[:, t:t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)
        assert cache.length == 16
        # several tokens at once after a prefix (explicit causal mask with an offset)
        cache.reset()
        model(ids[:, :6], cache=cache)
        chunk = model(ids[:, 6:11], cache=cache)
        torch.testing.assert_close(chunk, full[:, 6:11], atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_kv_cache_with_left_padding(position):
    model = tiny(position=position)
    g = torch.Generator().manual_seed(5)
    short, long_ = torch.randint(1, 61, (1, 7), generator=g), torch.randint(1, 61, (1, 12), generator=g)
    pad = long_.size(1) - short.size(1)
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long_])  # (2, 12)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with torch.no_grad():
        alone = [model(short), model(long_)]
        batched = model(ids, attention_mask=mask)  # no cache
        torch.testing.assert_close(batched[0, pad:], alone[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[1], alone[1][0], atol=1e-5, rtol=0)
        # incremental: prefill 8 columns, then one column at a time, mask growing with the cache
        cache = model.new_cache(2, 12)
        out = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache)]
        for t in range(8, 12):
            out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
        out = torch.cat(out, 1)
        assert torch.isfinite(out).all()  # padding rows included: no NaN anywhere
        torch.testing.assert_close(out[0, pad:], alone[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1], alone[1][0], atol=1e-5, rtol=0)


def test_cache_reorder_selects_rows():
    model = tiny()
    ids = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = model.new_cache(3, 8)
        model(ids, cache=cache)
        cache.reorder(torch.tensor([2, 2, 0]))
        nxt = torch.tensor([[1], [2], [3]])
        out = model(nxt, cache=cache)[:, 0]
        want = model(torch.cat([ids[[2, 2, 0]], nxt], 1))[:, -1]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_output_attentions():
    model = tiny()
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        logits, attns = model(ids, output_attentions=True)
        torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=0)
    assert len(attns) == 2 and attns[0].shape == (2, 4, 5, 5)
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 4, 5))
    assert (attns[1].triu(1) == 0).all()  # causal: no weight on the future


def test_rope_matches_llama_rotary():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    pos = torch.arange(3, 10)[None].expand(2, 7)
    cos, sin = rope_angles(pos, 8, 500.0)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, 8, 2).float() / 8))
    emb = torch.cat([pos[..., None].float() * inv_freq] * 2, -1)  # (B, T, 8), Llama's layout
    q_ref, k_ref = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    torch.testing.assert_close(apply_rope(q, cos, sin), q_ref)
    torch.testing.assert_close(apply_rope(k, cos, sin), k_ref)
    assert transformers  # imported for the reference only


def test_rope_has_no_position_table_and_relative_positions():
    model = tiny(position="rope", block_size=8)
    assert "transformer.wpe.weight" not in model.state_dict()
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():  # shifting every position by the same amount changes nothing (attention is relative)
        a = model(ids, position_ids=torch.arange(6)[None])
        b = model(ids, position_ids=torch.arange(100, 106)[None])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, d_model=256))
    c_proj = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    c_fc = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_fc.weight")])
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.02)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias") and "ln" not in n]
    assert biases and all((b == 0).all() for b in biases)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_param_counts():
    model = tiny()
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params(non_embedding=False) == sum(unique.values())
    assert model.num_params() == sum(unique.values()) - 32 * 32  # minus wpe (block 32 x d_model 32)
    # hand count: per block 2 LN(2d) + c_attn(d*3d+3d) + c_proj(d*d+d) + c_fc(d*4d+4d) + c_proj(4d*d+d)
    d, L, V = 32, 2, 61
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert model.num_params() == V * d + L * per_block + 2 * d
    assert model.describe() == f"GPT: {model.num_params() / 1e6:.2f}M parameters (2 layers, 4 heads, d_model 32, block 32)"
    untied = tiny(tie_embeddings=False, bias=False)
    assert untied.num_params(non_embedding=False) == sum(p.numel() for p in untied.parameters())
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert not any(n.endswith("bias") for n, _ in untied.named_parameters())


def test_gelu_variants_differ_only_in_activation():
    a, b = tiny(activation="gelu_tanh"), tiny(activation="gelu")
    ids = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=1e-3, rtol=0)
        assert not torch.equal(a(ids), b(ids))


def test_too_long_sequences_are_clear_errors():
    model = tiny(block_size=8)
    with pytest.raises(ConfigError, match="exceeds the model's block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ConfigError, match="block_size"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="d_model .* n_head"):
        GPTConfig(d_model=100, n_head=3)
    with pytest.raises(ConfigError, match="n_layer must be positive"):
        GPTConfig(n_layer=0)
    with pytest.raises(ConfigError, match="rope.*even"):
        GPTConfig(d_model=12, n_head=4, position="rope")
    with pytest.raises(ConfigError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="model.position.*'learned'"):
        from_dict(GPTConfig, {"position": "alibi"}, "model")
    with pytest.raises(ConfigError, match="did you mean 'n_head'"):
        build_model("gpt", {"n_heads": 4})


def test_build_from_registry_and_dict_roundtrip():
    model = build_model("gpt", {**TINY, "position": "rope", "d_ff": 48})
    assert isinstance(model, GPT) and model.transformer.h[0].mlp.c_fc.out_features == 48
    assert model(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 61)
