"""The LSTM LM against a hand-computed LSTM unroll, and its cache against the full forward."""
import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import arch_of, build_model
from lmforge.models.lstm import LSTMConfig, LSTMLM


def tiny(**kw) -> LSTMLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=12, d_hidden=16, n_layer=2, dropout=0.0, tie_embeddings=True)
    cfg.update(kw)
    return LSTMLM(LSTMConfig(**cfg)).eval()


def hand_unroll(model: LSTMLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits from the LSTM equations written out, one time step and one layer at a time:
    i, f, g, o = split(W_ih x + b_ih + W_hh h + b_hh); c = sig(f) c + sig(i) tanh(g); h = sig(o) tanh(c)."""
    lstm, cfg = model.lstm, model.config
    B, T = ids.shape
    h = [torch.zeros(B, cfg.d_hidden) for _ in range(cfg.n_layer)]
    c = [torch.zeros(B, cfg.d_hidden) for _ in range(cfg.n_layer)]
    logits = []
    for t in range(T):
        x = model.embedding.weight[ids[:, t]]
        for k in range(cfg.n_layer):
            gates = (x @ getattr(lstm, f"weight_ih_l{k}").T + getattr(lstm, f"bias_ih_l{k}")
                     + h[k] @ getattr(lstm, f"weight_hh_l{k}").T + getattr(lstm, f"bias_hh_l{k}"))
            i, f, g, o = gates.chunk(4, dim=1)
            c[k] = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
            h[k] = torch.sigmoid(o) * torch.tanh(c[k])
            x = h[k]
        if model.proj is not None:
            x = model.proj(x)
        logits.append(x @ model.decoder.weight.T + model.decoder.bias)
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("tie,d_hidden", [(True, 16), (True, 12), (False, 16)])
def test_forward_equals_hand_unroll(tie, d_hidden):
    model = tiny(tie_embeddings=tie, d_hidden=d_hidden)
    assert (model.proj is not None) == (tie and d_hidden != 12)
    ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hand_unroll(model, ids), atol=1e-5, rtol=1e-5)
    # The same with torch.nn.LSTMCell holding layer 0's weights (an independent implementation).
    cell = torch.nn.LSTMCell(12, d_hidden)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(model.lstm, f"{n}_l0"))
        h = c = torch.zeros(3, d_hidden)
        outs = []
        for t in range(9):
            h, c = cell(model.embedding(ids[:, t]), (h, c))
            outs.append(h)
        ref = torch.stack(outs, 1)
        one = torch.nn.LSTM(12, d_hidden, batch_first=True)
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(one, f"{n}_l0").copy_(getattr(model.lstm, f"{n}_l0"))
        torch.testing.assert_close(one(model.embedding(ids))[0], ref, atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_full_forward():
    model = tiny()
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 10)
        parts = [model(ids[:, :4], cache=cache)]
        for t in range(4, 10):
            parts.append(model(ids[:, t : t + 1], cache=cache))
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_leaves_state_unchanged_and_reorder():
    model = tiny()
    a = torch.randint(5, 50, (1, 6))
    b = torch.randint(5, 50, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        out = model(batch, attention_mask=mask, cache=cache)
        torch.testing.assert_close(out[1, 2:], model(b)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
        cache.reorder(torch.tensor([1, 1]))
        nxt = model(torch.tensor([[7], [7]]), attention_mask=torch.ones(2, 7, dtype=torch.long), cache=cache)
        ref = model(torch.cat([b, torch.tensor([[7]])], 1))[0, -1]
    torch.testing.assert_close(nxt[0, 0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[1, 0], ref, atol=1e-5, rtol=1e-5)


def test_generate_with_and_without_cache():
    from lmforge.generation import generate

    model = tiny()
    prompts = [[5, 6, 7], [8, 9]]
    cached = generate(model, prompts, max_new_tokens=6)
    assert cached == generate(model, prompts, max_new_tokens=6, use_cache=False)
    assert cached[1] == generate(model, [[8, 9]], max_new_tokens=6)[0]  # left padding is invisible
    beams = generate(model, prompts, max_new_tokens=4, num_beams=3)
    assert [len(b) for b in beams] == [4, 4]


def test_registry_counts_and_errors():
    model = build_model("lstm", {"vocab_size": 50, "d_model": 8, "d_hidden": 8, "n_layer": 1})
    assert arch_of(model) == "lstm"
    assert model.decoder.weight is model.embedding.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert "LSTM LM" in model.describe()
    with pytest.raises(ConfigError, match="model.n_layer"):
        LSTMConfig(n_layer=0)
    with pytest.raises(ConfigError, match="dropout"):
        LSTMConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="attention"):
        model(torch.zeros(1, 3, dtype=torch.long), output_attentions=True)


def test_trains_with_the_clm_objective():
    from lmforge.train.clm import CLMObjective

    model = tiny(n_layer=1).train()
    ids = (torch.arange(4 * 17).view(4, 17) % 7) + 5  # a periodic sequence: learnable in a few steps
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    first = None
    for _ in range(60):
        loss, _ = CLMObjective().loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    assert loss.item() < 0.2 * first

