"""Weight-only low precision for generation (`lmforge.quantize`): each low-precision Linear equals the
plain Linear with its stored (rounded) weight, and a trained model stays close to fp32: logits, greedy
tokens, held-out perplexity. Then the `--weights` option of `lmforge generate`."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.generation import generate
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.quantize import WEIGHTS, LowPrecisionLinear, prepare_for_generation

VOCAB = 24


def sequence(n: int, seed: int) -> torch.Tensor:
    """A learnable token stream: mostly +1 or +3 (mod VOCAB) depending on the token two back, some noise."""
    rng = np.random.default_rng(seed)
    toks = [0, 1]
    for _ in range(n - 2):
        step = 1 if toks[-2] % 2 == 0 else 3
        toks.append((toks[-1] + (step if rng.random() < 0.9 else rng.integers(VOCAB))) % VOCAB)
    return torch.tensor(toks)


@pytest.fixture(scope="module")
def trained() -> GPT:
    """A small GPT trained for a few hundred steps (its predictions are confident, as a real model's)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, d_model=64))
    data = sequence(20_000, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        starts = torch.randint(0, len(data) - 33, (16,), generator=gen)
        chunk = torch.stack([data[s:s + 33] for s in starts.tolist()])
        F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def perplexity(model: nn.Module, data: torch.Tensor) -> float:
    windows = data[: (len(data) - 1) // 64 * 64 + 1]
    ids = windows[:-1].view(-1, 64)
    labels = windows[1:].view(-1, 64)
    with torch.no_grad():
        return math.exp(F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten()).item())


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("bias", [True, False])
def test_low_precision_linear_equals_linear_with_its_stored_weight(weights, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias)
    if bias:
        nn.init.normal_(lin.bias)
    q = LowPrecisionLinear.from_linear(lin, weights)
    x = torch.randn(3, 5, 48)
    # the reference: fp32 arithmetic on the weight as stored; bf16/int8 also round the activations to
    # bf16 (their kernels take bf16 inputs) and their output to bf16
    xr = x if weights == "fp16" else x.bfloat16().float()
    ref = F.linear(xr, q.dequantized(), lin.bias)
    tol = dict(rtol=1e-5, atol=1e-5) if weights == "fp16" else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(q(x), ref, **tol)
    assert q(x).dtype == torch.float32 and q(x).shape == (3, 5, 40)
    # and the stored weight is the fp32 weight, rounded: per element for fp16/bf16, per row for int8
    err = (q.dequantized() - lin.weight).abs()
    bound = {"fp16": 2**-11, "bf16": 2**-8}.get(weights)
    if bound:
        assert (err <= lin.weight.abs() * bound + 1e-12).all()
    else:
        assert (err <= q.scale[:, None] / 2 + 1e-7).all()


def test_every_linear_is_replaced_once_and_the_tied_head_too(trained):
    model = prepare_for_generation(copy.deepcopy(trained), "int8")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    low = [m for m in model.modules() if isinstance(m, LowPrecisionLinear)]
    assert not linears and len(low) == 2 * 4 + 1  # 4 per block + the head
    assert model.transformer.wte.weight.dtype == torch.float32  # embeddings stay as trained
    assert model.lm_head.weight.dtype == torch.int8 and not model.training


@pytest.mark.parametrize("weights", WEIGHTS)
def test_trained_model_stays_close_to_fp32(trained, weights):
    model = prepare_for_generation(copy.deepcopy(trained), weights)
    held_out = sequence(4_000, seed=1)
    ids = held_out[:65][None, :-1]
    with torch.no_grad():
        ref, out = trained(ids), model(ids)
    spread = ref.std().item()
    worst = {"fp16": 2e-3, "bf16": 3e-2, "int8": 3e-2}[weights]  # max |logit error| / std of the logits
    assert (out - ref).abs().max().item() / spread < worst
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.95
    ppl, ppl_ref = perplexity(model, held_out), perplexity(trained, held_out)
    assert abs(ppl / ppl_ref - 1) < {"fp16": 1e-4, "bf16": 5e-3, "int8": 5e-3}[weights]
    prompts = [held_out[100:108].tolist(), held_out[300:303].tolist()]
    assert generate(model, prompts, max_new_tokens=40) == generate(trained, prompts, max_new_tokens=40)


def test_fp32_is_layout_only_and_bad_values_are_config_errors(trained):
    model = prepare_for_generation(copy.deepcopy(trained), "fp32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ConfigError, match="weights must be one of"):
        prepare_for_generation(copy.deepcopy(trained), "int4")
    big = nn.Linear(4, 4)
    with torch.no_grad():
        big.weight[0, 0] = 1e6
    with pytest.raises(ConfigError, match="fp16's range"):
        LowPrecisionLinear.from_linear(big, "fp16")


def test_recipe_weights_option(monkeypatch, trained, capsys):
    import lmforge.recipes.generate as mod

    class Tok:  # one character per token
        eos_id, pad_id = None, None

        def encode(self, text):
            return [ord(c) - 97 for c in text]

        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)

    loaded = []

    def fake_load(path, device="cpu"):
        loaded.append(copy.deepcopy(trained))
        return loaded[-1], Tok(), {"arch": "gpt"}

    monkeypatch.setattr(mod, "load_model", fake_load)
    plain = mod.generate("m", prompt="abcd", strategy="greedy", max_new_tokens=20)
    fast = mod.generate("m", prompt="abcd", strategy="greedy", max_new_tokens=20, weights="int8")
    assert isinstance(loaded[1].lm_head, LowPrecisionLinear) and isinstance(loaded[0].lm_head, nn.Linear)
    assert fast == plain
    with pytest.raises(ConfigError):
        mod.generate("m", prompt="abcd", weights="int3")


def test_a_linear_registered_twice_gets_one_copy():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(8, 3))
    x = torch.randn(2, 8)
    ref = model(x)
    prepare_for_generation(model, "int8")
    assert model[0] is model[2] and isinstance(model[0], LowPrecisionLinear)
    torch.testing.assert_close(model(x), ref, rtol=0.05, atol=0.01)


@pytest.mark.parametrize("width", [8, 24, 40, 48])
def test_int8_is_right_for_widths_the_fast_kernel_does_not_handle(width):
    """The CPU int8 kernel is used only for in_features % 16 == 0 (it crashed at 8 and summed wrongly at
    24 and 40); every width equals the dequantized weights' product."""
    torch.manual_seed(0)
    linear = nn.Linear(width, 8)
    q = LowPrecisionLinear.from_linear(linear, "int8")
    x = torch.randn(3, width)
    ref = F.linear(x, q.dequantized(), linear.bias)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref, rtol=0.02, atol=0.02 * float(ref.detach().abs().max()))
