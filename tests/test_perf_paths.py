"""Every fast path equals the plain path it replaces (issue #5): the GPT head at the kept positions only,
the fused q/k/v split, generation asking for the last logits only, the decoding weight layout, fused
AdamW on CPU, activation checkpointing. No timing here: the speed is measured in bench/bench_cpu.py."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.generation import generate
from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.quantize import ChunkedLinear, _chunks_for, prepare_for_generation
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import apply_activation_checkpointing
from lmforge.train.trainer import build_optimizer


def gpt(position="learned", dropout=0.0, seed=0, bias=True) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=37, block_size=32, n_layer=2, n_head=4, d_model=32, dropout=dropout,
                          position=position, bias=bias))
    with torch.no_grad():  # larger weights than GPT-2's init, so that outputs differ between tokens
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


class NoKeepArg(nn.Module):
    """The same model behind a forward without `logits_to_keep`: generation must take the plain path."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model, self.max_seq_len = model, model.max_seq_len

    def new_cache(self, batch_size, max_len):
        return self.model.new_cache(batch_size, max_len)

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None):
        return self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache)


# ---- GPT -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_logits_to_keep_equals_the_last_positions_of_the_full_logits(position):
    model = gpt(position)
    ids = torch.randint(0, 37, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded row
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        for n in (1, 3):
            torch.testing.assert_close(model(ids, attention_mask=mask, logits_to_keep=n), full[:, -n:])
        cache = model.new_cache(3, 16)  # with a cache: prefill, then one token
        torch.testing.assert_close(model(ids, attention_mask=mask, cache=cache, logits_to_keep=1), full[:, -1:])
        nxt = torch.randint(0, 37, (3, 1))
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        step = model(nxt, attention_mask=mask2, cache=cache, logits_to_keep=1)
        torch.testing.assert_close(step, model(torch.cat([ids, nxt], 1), attention_mask=mask2)[:, -1:])


def test_fused_qkv_split_equals_split_view_transpose():
    """The attention's permute/unbind of the fused projection gives the same q, k, v (and output) as
    splitting it into three and transposing each (the textbook form, as nanoGPT writes it)."""
    model = gpt()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 7, 32)
    q, k, v = attn.c_attn(x).split(32, dim=2)
    q, k, v = (t.view(2, 7, 4, 8).transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 7, 32)
    out, _ = attn(x, is_causal=True)
    torch.testing.assert_close(out, attn.c_proj(ref), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3), dict(use_cache=False),
                                    dict(do_sample=True, seed=3, top_k=5)])
def test_generation_asking_for_the_last_logits_only_gives_the_same_tokens(kwargs):
    model = gpt()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    assert generate(model, prompts, max_new_tokens=12, **kwargs) == \
        generate(NoKeepArg(model), prompts, max_new_tokens=12, **kwargs)


@pytest.mark.parametrize("bias", [True, False])
def test_decoding_layout_keeps_values_names_and_tokens(bias):
    plain = gpt(bias=bias)
    fast = prepare_for_generation(copy.deepcopy(plain), "fp32")
    assert fast.lm_head.weight is fast.transformer.wte.weight  # still tied
    for (n, p), (m, q) in zip(plain.state_dict().items(), fast.state_dict().items()):
        assert n == m and p.shape == q.shape and torch.equal(p, q), n
    assert not fast.transformer.h[0].attn.c_attn.weight.is_contiguous()  # column-major now
    ids = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), plain(ids))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(fast, prompts, max_new_tokens=15) == generate(plain, prompts, max_new_tokens=15)
    assert generate(fast, prompts, max_new_tokens=6, num_beams=2) == generate(plain, prompts, max_new_tokens=6,
                                                                               num_beams=2)


@pytest.mark.parametrize("chunks", [2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_linear_equals_linear(chunks, bias):
    torch.manual_seed(chunks)
    linear = nn.Linear(48, 96, bias=bias)
    fast = ChunkedLinear(linear, chunks)
    assert fast.weight is linear.weight and fast.bias is linear.bias  # shared, not copied
    for shape in [(1, 48), (5, 48), (2, 7, 48), (48,)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(fast(x), F.linear(x, linear.weight, linear.bias), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out % chunks"):
        ChunkedLinear(nn.Linear(48, 97), 2)
    with pytest.raises(ValueError, match="contiguous"):
        ChunkedLinear(nn.Linear(48, 96), 1)


def test_chunk_count_divides_and_keeps_blocks_large():
    assert _chunks_for(2304, 2) == 2 and _chunks_for(3072, 4) == 4 and _chunks_for(768, 16) == 6
    assert _chunks_for(50257, 2) == 1  # no even split: the column-major single GEMV instead
    assert _chunks_for(96, 2) == 1 and _chunks_for(2304, 1) == 1


def test_decoding_on_several_threads_chunks_layers_and_keeps_tokens():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=301, block_size=32, n_layer=2, n_head=4, d_model=256)).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = prepare_for_generation(copy.deepcopy(plain), "fp32")
    finally:
        torch.set_num_threads(threads)
    assert isinstance(fast.transformer.h[0].attn.c_attn, ChunkedLinear)  # 768 rows: 2 blocks of 384
    assert isinstance(fast.transformer.h[0].mlp.c_fc, ChunkedLinear)
    assert fast.lm_head.weight is fast.transformer.wte.weight  # 301 rows: no even split, still tied
    assert not fast.lm_head.weight.is_contiguous()  # column-major instead
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    ids = torch.randint(0, 301, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), plain(ids))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(fast, prompts, max_new_tokens=15) == generate(plain, prompts, max_new_tokens=15)


# ---- training ----------------------------------------------------------------------------------------------
def test_cpu_optimizer_is_fused_and_equals_foreach():
    # no biases: the key bias's gradient is zero up to rounding (softmax ignores a constant per query), and
    # Adam turns rounding noise of that size into full-size updates, differently in each kernel
    model = gpt(bias=False)
    fused = build_optimizer(model, TrainConfig(lr=1e-2), torch.device("cpu"))
    assert all(g["fused"] for g in fused.param_groups)
    twin = copy.deepcopy(model)
    ref = torch.optim.AdamW([{"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.99), eps=1e-8, foreach=True)
    ids = torch.randint(0, 37, (4, 12))
    for _ in range(5):
        for m, opt in ((model, fused), (twin, ref)):
            F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs its forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(arch):
    torch.manual_seed(0)
    if arch == "gpt":
        plain = GPT(GPTConfig(vocab_size=37, block_size=16, n_layer=3, n_head=2, d_model=16, dropout=0.2)).train()
    else:
        plain = Bert(BertConfig(vocab_size=37, max_position=16, n_layer=3, n_head=2, d_model=16, d_ff=32)).train()
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain))
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    ids = torch.randint(0, 37, (2, 16))
    saved = []
    for m in (plain, ckpt):
        torch.manual_seed(5)  # the same dropout noise: the wrapper replays the RNG state when recomputing
        n, out = _saved_bytes(lambda: m(ids) if arch == "gpt" else m(ids).last_hidden_state)
        out.pow(2).mean().backward()
        saved.append(n)
    assert saved[1] < saved[0] / 2
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_activation_checkpointing_every_other_block_and_errors():
    model = GPT(GPTConfig(vocab_size=37, block_size=16, n_layer=4, n_head=2, d_model=16))
    apply_activation_checkpointing(model, every=2)
    kinds = [type(b).__name__ for b in model.transformer.h]
    assert kinds == ["CheckpointWrapper", "Block", "CheckpointWrapper", "Block"]
    with pytest.raises(ValueError, match="every"):
        apply_activation_checkpointing(model, every=0)
    with pytest.raises(ValueError, match="no list of blocks"):
        apply_activation_checkpointing(nn.Linear(2, 2))
    assert math.isfinite(model(torch.randint(0, 37, (1, 8))).sum().item())
