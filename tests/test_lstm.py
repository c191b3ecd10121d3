"""The recurrent LM (cells rnn, gru, lstm) against the textbook equations written out and against torch's
own RNN/GRU/LSTM and *Cell modules stepped one token at a time; its cache against the full forward."""
import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.models import arch_of, build_model
from lmforge.models.lstm import LSTMConfig, LSTMLM

CELLS = ["rnn", "gru", "lstm"]
TORCH_CELL = {"rnn": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}
TORCH_STACK = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def tiny(**kw) -> LSTMLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, d_model=12, d_hidden=16, n_layer=2, dropout=0.0, tie_embeddings=True)
    cfg.update(kw)
    return LSTMLM(LSTMConfig(**cfg)).eval()


def textbook_step(cell: str, x, h, c, W_ih, W_hh, b_ih, b_hh):
    """One step of one layer, from the equations (not from torch's modules)."""
    sig = torch.sigmoid
    if cell == "rnn":  # h_t = tanh(W_xh x_t + W_hh h_{t-1} + b), b = b_ih + b_hh
        return torch.tanh(x @ W_ih.T + h @ W_hh.T + (b_ih + b_hh)), None
    if cell == "gru":
        xr, xz, xn = (x @ W_ih.T + b_ih).chunk(3, dim=1)
        hr, hz, hn = (h @ W_hh.T + b_hh).chunk(3, dim=1)
        r, z = sig(xr + hr), sig(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    i, f, g, o = (x @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, dim=1)
    c = sig(f) * c + sig(i) * torch.tanh(g)
    return sig(o) * torch.tanh(c), c


def hand_unroll(model: LSTMLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-layer states, logits) from the equations, one time step and one layer at a time."""
    rec, cfg = model.recurrent, model.config
    B, T = ids.shape
    h = [torch.zeros(B, cfg.d_hidden) for _ in range(cfg.n_layer)]
    c = [torch.zeros(B, cfg.d_hidden) for _ in range(cfg.n_layer)]
    states, logits = [], []
    for t in range(T):
        x = model.embedding.weight[ids[:, t]]
        for k in range(cfg.n_layer):
            w = [getattr(rec, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            h[k], c[k] = textbook_step(cfg.cell, x, h[k], c[k], *w)
            x = h[k]
        states.append(x)
        if model.proj is not None:
            x = model.proj(x)
        logits.append(x @ model.decoder.weight.T + model.decoder.bias)
    return torch.stack(states, dim=1), torch.stack(logits, dim=1)


def copy_layer(dst, src, k: int, dst_suffix: str = "") -> None:
    for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(dst, f"{n}{dst_suffix}").copy_(getattr(src, f"{n}_l{k}"))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tie,d_hidden", [(True, 16), (True, 12), (False, 16)])
def test_forward_equals_the_equations(cell, tie, d_hidden):
    model = tiny(cell=cell, tie_embeddings=tie, d_hidden=d_hidden)
    assert (model.proj is not None) == (tie and d_hidden != 12)
    ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        states, logits = hand_unroll(model, ids)
        torch.testing.assert_close(model(ids), logits, atol=1e-5, rtol=1e-5)
        # encode: everything but the decoder (the projection to d_model included when tying adds one)
        enc = states if model.proj is None else model.proj(states)
        torch.testing.assert_close(model.encode(ids), enc, atol=1e-5, rtol=1e-5)
        assert model.encode(ids).shape[-1] == model.hidden_size == (12 if tie else d_hidden)


@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_equals_torch_stepped_one_token_at_a_time(cell):
    """A separate torch.nn.RNN/GRU/LSTM and a stack of torch.nn.*Cell, holding our weights and fed one
    token at a time with the state carried by hand, give our top-layer states."""
    model = tiny(cell=cell, tie_embeddings=False)  # untied: encode is the top layer's states themselves
    ids = torch.randint(0, 50, (3, 9))
    B, T, L, H = 3, 9, 2, 16
    with torch.no_grad():
        ours = model.encode(ids)
        stack = TORCH_STACK[cell](12, H, num_layers=L, batch_first=True)
        cells = [TORCH_CELL[cell](12 if k == 0 else H, H) for k in range(L)]
        for k in range(L):
            copy_layer(stack, model.recurrent, k, f"_l{k}")
            copy_layer(cells[k], model.recurrent, k)
        h0 = torch.zeros(L, B, H)
        state = (h0, h0.clone()) if cell == "lstm" else h0
        by_stack, by_cells = [], []
        hc = [(torch.zeros(B, H), torch.zeros(B, H)) for _ in range(L)]
        for t in range(T):
            x = model.embedding(ids[:, t : t + 1])  # (B, 1, d_model)
            o, state = stack(x, state)
            by_stack.append(o[:, 0])
            x = x[:, 0]
            for k in range(L):
                if cell == "lstm":
                    hc[k] = cells[k](x, hc[k])
                else:
                    hc[k] = (cells[k](x, hc[k][0]), None)
                x = hc[k][0]
            by_cells.append(x)
    torch.testing.assert_close(ours, torch.stack(by_stack, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, torch.stack(by_cells, 1), atol=1e-5, rtol=1e-5)
    assert model.hidden_size == H and ours.shape == (B, T, H)


def test_rnn_cell_is_the_textbook_formula_with_one_bias():
    """h_t = tanh(W_hh h_{t-1} + W_xh x_t + b): torch's two bias vectors act only through their sum."""
    model = tiny(cell="rnn", n_layer=1, tie_embeddings=False)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        before = model.encode(ids)
        b = model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0
        model.rnn.bias_ih_l0.copy_(b)
        model.rnn.bias_hh_l0.zero_()
        torch.testing.assert_close(model.encode(ids), before, atol=1e-6, rtol=1e-6)
        x, h = model.embedding(ids), torch.zeros(2, 16)
        for t in range(5):
            h = torch.tanh(h @ model.rnn.weight_hh_l0.T + x[:, t] @ model.rnn.weight_ih_l0.T + b)
            torch.testing.assert_close(before[:, t], h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_cached_decoding_equals_full_forward(cell):
    model = tiny(cell=cell)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 10)
        parts = [model(ids[:, :4], cache=cache)]
        for t in range(4, 10):
            parts.append(model(ids[:, t : t + 1], cache=cache))
    assert cache.length == 10
    assert (cache.c is None) == (cell != "lstm")
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_left_padding_leaves_state_unchanged_and_reorder(cell):
    model = tiny(cell=cell)
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
        # encode: left padding is skipped, right padding changes nothing before it
        enc = model.encode(batch, attention_mask=mask)
        torch.testing.assert_close(enc[1, 2:], model.encode(b)[0], atol=1e-5, rtol=1e-5)
        right = torch.cat([b, torch.zeros(1, 2, dtype=torch.long)], 1)
        enc_r = model.encode(torch.cat([a, right]), attention_mask=torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]))
        torch.testing.assert_close(enc_r[1, :4], model.encode(b)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc_r[0], model.encode(a)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[0, 0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nxt[1, 0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_generate_with_and_without_cache(cell):
    from lmforge.generation import generate

    model = tiny(cell=cell)
    prompts = [[5, 6, 7], [8, 9]]
    cached = generate(model, prompts, max_new_tokens=6)
    assert cached == generate(model, prompts, max_new_tokens=6, use_cache=False)
    assert cached[1] == generate(model, [[8, 9]], max_new_tokens=6)[0]  # left padding is invisible
    beams = generate(model, prompts, max_new_tokens=4, num_beams=3)
    assert [len(b) for b in beams] == [4, 4]


def test_lstm_checkpoints_from_before_the_cell_choice_still_load(tmp_path):
    """A config without `cell` is an LSTM with the state-dict names the earlier model wrote."""
    from lmforge.config import save_yaml
    from lmforge.storage import save_tensors
    from lmforge.train.checkpoint import load_pretrained

    old_names = ["embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0",
                 "decoder.weight", "decoder.bias"]
    values = {"vocab_size": 50, "d_model": 8, "d_hidden": 8, "n_layer": 1, "dropout": 0.0, "tie_embeddings": True,
              "init_range": 0.1}
    model = build_model("lstm", values)
    assert model.config.cell == "lstm" and list(model.state_dict()) == old_names
    from lmforge.text.tokenizer import build_char

    torch.manual_seed(3)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    state["decoder.weight"] = state["embedding.weight"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_yaml({"arch": "lstm", "model": values}, ckpt / "config.yaml")
    save_tensors(state, ckpt / "model.safetensors")
    build_char("abcdefgh").save(ckpt / "tokenizer.json")
    loaded, _, _ = load_pretrained(ckpt)
    assert loaded.config.cell == "lstm"
    torch.testing.assert_close(loaded.lstm.weight_hh_l0, state["lstm.weight_hh_l0"])


@pytest.mark.parametrize("cell", CELLS)
def test_registry_counts_and_errors(cell):
    model = build_model("lstm", {"vocab_size": 50, "d_model": 8, "d_hidden": 8, "n_layer": 1, "cell": cell})
    assert arch_of(model) == "lstm"
    assert model.decoder.weight is model.embedding.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    assert model.num_params() == 50 * 8 + gates * (8 * 8 + 8 * 8 + 2 * 8) + 50
    assert f"{cell.upper()} LM" in model.describe()
    assert all(k.startswith((f"{cell}.", "embedding.", "decoder.")) for k in model.state_dict())
    with pytest.raises(ConfigError, match="attention"):
        model(torch.zeros(1, 3, dtype=torch.long), output_attentions=True)


def test_config_errors():
    with pytest.raises(ConfigError, match="model.n_layer"):
        LSTMConfig(n_layer=0)
    with pytest.raises(ConfigError, match="dropout"):
        LSTMConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="model.cell must be one of rnn, gru, lstm"):
        LSTMConfig(cell="transformer")
    with pytest.raises(ConfigError, match=r"model.cell: 'gur' is not one of .*did you mean 'gru'"):
        build_model("lstm", {"cell": "gur"})


@pytest.mark.parametrize("cell", CELLS)
def test_trains_with_the_clm_objective(cell):
    from lmforge.train.clm import CLMObjective

    model = tiny(n_layer=1, cell=cell).train()
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


@pytest.mark.parametrize("cell", CELLS)
def test_encode_width_is_what_task_heads_are_built_for(cell):
    """Fine-tuning sizes its head from the backbone; a tied recurrent model's encode is d_model wide."""
    from lmforge.tasks.base import hidden_size

    model = tiny(cell=cell, d_hidden=20)  # tied, so a projection 20 -> 12 feeds the decoder
    assert model.encode(torch.randint(0, 50, (2, 4))).shape == (2, 4, hidden_size(model)) == (2, 4, 12)
