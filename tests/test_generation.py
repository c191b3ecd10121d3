"""generate(): brute-force references (argmax loop, exhaustive beam search), cache == no cache, batching
== one prompt at a time, hand-computed logit filters, and token-for-token parity with transformers'
`generate` (greedy, beam search, sampling). Then the `lmforge generate` recipe with a mocked loader."""
import itertools
import math

import pytest
import torch

from lmforge import generation
from lmforge.errors import ConfigError, DataError
from lmforge.generation import apply_repetition_penalty, generate, top_k_filter, top_p_filter
from lmforge.models.gpt import GPT, GPTConfig

PROMPTS = [[3, 5, 7], [1, 2], [9, 9, 4, 2, 11], [6]]



def tiny(vocab=16, block=48, position="learned", seed=0, std=0.3) -> GPT:
    """A random tiny GPT with large weights, so that its outputs vary (default GPT-2 init is near-uniform)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=4, d_model=32, position=position))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight")
                     else 0.0) + std * torch.randn_like(p))
    return model.eval()


def hf_and_ours(vocab=16, seed=0):
    """A random tiny GPT2LMHeadModel and our GPT holding the same weights."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    ours = tiny(vocab=vocab, block=48, seed=seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=48, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(conv1d) else v) for k, v in ours.state_dict().items()}
    hf.load_state_dict(sd, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([PROMPTS[0]])).logits, ours(torch.tensor([PROMPTS[0]])),
                                   atol=1e-5, rtol=1e-5)
    return hf, ours


def hf_generate(hf, prompts, eos=None, **kw) -> list[list[int]]:
    """HF generate on left-padded prompts; new tokens up to (not including) the first eos."""
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=eos, **kw)[:, P:].tolist()
    return [r[:r.index(eos)] if eos is not None and eos in r else r for r in out]


# ---------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------


def test_greedy_equals_bruteforce_argmax_loop():
    model = tiny()
    for prompt in PROMPTS:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert generate(model, [prompt], max_new_tokens=10) == [seq[len(prompt):]]


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cache_equals_no_cache_batched_with_left_padding(position):
    model = tiny(position=position)
    for kw in (dict(), dict(do_sample=True, seed=3, top_k=8, temperature=0.9), dict(num_beams=3, eos_token_id=11)):
        with_cache = generate(model, PROMPTS, max_new_tokens=12, **kw)
        assert generate(model, PROMPTS, max_new_tokens=12, use_cache=False, **kw) == with_cache
        if not kw.get("do_sample"):  # padding changes nothing: each prompt as if alone
            assert [generate(model, [p], max_new_tokens=12, **kw)[0] for p in PROMPTS] == with_cache


def test_seed_reproducible_and_global_rng_untouched():
    model = tiny()
    state = torch.get_rng_state()
    a = generate(model, PROMPTS, max_new_tokens=15, do_sample=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, PROMPTS, max_new_tokens=15, do_sample=True, seed=7) == a
    assert generate(model, PROMPTS, max_new_tokens=15, do_sample=True, seed=8) != a


def test_beam_search_with_one_beam_is_greedy():
    model = tiny()
    ids, mask = generation._left_pad(PROMPTS, 0, "cpu")
    for eos in (None, 11, 1):
        with torch.inference_mode():
            beam = generation._beam_search(model, ids, mask, 12, 1, 1.0, True, eos, [], 1.0, True)
        assert beam == generate(model, PROMPTS, max_new_tokens=12, eos_token_id=eos)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
@pytest.mark.parametrize("seed, prompt", [(4, [1, 2]), (5, [3, 1, 0])])  # cases where greedy is not optimal
def test_beam_search_equals_exhaustive_search(length_penalty, seed, prompt):
    """Vocab 5 with eos 4, 3 new tokens: with enough beams, beam search must find the best-scoring of
    all 85 possible outputs (score = sum log p / length ** length_penalty, eos counted in the length)."""
    model, eos = tiny(vocab=5, seed=seed), 4

    def logprob(tokens):
        with torch.no_grad():
            logp = model(torch.tensor([prompt + tokens])).log_softmax(-1)[0]
        return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))

    candidates = [list(s) + [eos] for n in range(3) for s in itertools.product(range(4), repeat=n)]
    candidates += [list(s) for s in itertools.product(range(4), repeat=3)]
    assert len(candidates) == 85
    best = max(candidates, key=lambda s: logprob(s) / len(s) ** length_penalty)
    best = best[:-1] if best[-1] == eos else best
    found = generate(model, [prompt], max_new_tokens=3, num_beams=90, length_penalty=length_penalty, eos_token_id=eos)
    assert found == [best]
    if seed == 4 and length_penalty == 1.0:  # the test has teeth: greedy and 2 beams miss the best
        assert best == [1, 2, 2] and generate(model, [prompt], max_new_tokens=3, eos_token_id=eos) == [[]]
        assert generate(model, [prompt], max_new_tokens=3, num_beams=2, eos_token_id=eos) == [[3, 1]]


def test_works_with_any_model_that_has_the_interface():
    """A bigram model with a do-nothing cache: generation relies only on the documented interface."""

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(7, 7, generator=torch.Generator().manual_seed(0)))

        def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None):
            return self.table[input_ids]  # (B, T, V): each position only looks at its own token

        def new_cache(self, batch_size, max_len):
            return type("NoState", (), {"reorder": lambda self, index: None})()

    model = Bigram()
    succ = model.table.argmax(-1).tolist()
    out = generate(model, [[0], [3, 1]], max_new_tokens=5)
    for prompt, o in zip([[0], [3, 1]], out):
        seq = prompt + o
        assert all(seq[i + 1] == succ[seq[i]] for i in range(len(prompt) - 1, len(seq) - 1))
    assert generate(model, [[0], [3, 1]], max_new_tokens=5, num_beams=2, use_cache=False) == \
        generate(model, [[0], [3, 1]], max_new_tokens=5, num_beams=2)


# ---------------------------------------------------------------------------------------------------
# parity with transformers' generate
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eos", [None, 11])
def test_greedy_and_beam_match_transformers(eos):
    hf, ours = hf_and_ours()
    for num_beams, length_penalty, early_stopping in [(1, 1.0, True), (3, 1.0, True), (3, 2.0, False), (4, 0.0, True)]:
        kw = dict(max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
        theirs = hf_generate(hf, PROMPTS, eos=eos, do_sample=False, **kw)
        assert generate(ours, PROMPTS, eos_token_id=eos, **kw) == theirs, kw


def test_sampling_matches_transformers_with_the_same_seed():
    """HF samples from the global generator; ours from a local one seeded alike: the draws coincide."""
    hf, ours = hf_and_ours(seed=1)
    settings = [dict(temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.0),
                dict(temperature=1.0, top_k=5, top_p=1.0, repetition_penalty=1.3),
                dict(temperature=1.2, top_k=0, top_p=0.8, repetition_penalty=1.0)]
    for kw, prompt in itertools.product(settings, PROMPTS[:2]):
        torch.manual_seed(123)
        theirs = hf_generate(hf, [prompt], eos=11, do_sample=True, max_new_tokens=12, **kw)
        assert generate(ours, [prompt], eos_token_id=11, do_sample=True, seed=123, max_new_tokens=12, **kw) == theirs


# ---------------------------------------------------------------------------------------------------
# logit processors, stopping
# ---------------------------------------------------------------------------------------------------


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_filter():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]])
    assert kept(top_k_filter(logits, 1)) == [1, 3]  # ties with the k-th survive
    assert kept(top_k_filter(logits, 3)) == [1, 2, 3]
    assert kept(top_k_filter(logits, 0)) == [0, 1, 2, 3, 4]
    assert torch.equal(top_k_filter(logits, 3)[0, [1, 2, 3]], logits[0, [1, 2, 3]])


def test_top_p_filter():
    # probabilities 0.5, 0.3, 0.15, 0.05 (tokens 2, 0, 3, 1)
    logits = torch.tensor([[0.3, 0.05, 0.5, 0.15]]).log()
    assert kept(top_p_filter(logits, 0.5)) == [2]  # the top token alone reaches 0.5
    assert kept(top_p_filter(logits, 0.7)) == [0, 2]  # 0.5 < 0.7 <= 0.8
    assert kept(top_p_filter(logits, 0.85)) == [0, 2, 3]  # 0.8 < 0.85 <= 0.95
    assert kept(top_p_filter(logits, 0.99)) == [0, 1, 2, 3]
    assert kept(top_p_filter(logits, 0.01)) == [2]  # the top token always stays
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]  # positive / 2, negative * 2, unseen untouched


def test_repetition_penalty_discourages_repeats_in_generation():
    model = tiny()
    plain = generate(model, PROMPTS, max_new_tokens=12)
    strong = generate(model, PROMPTS, max_new_tokens=12, repetition_penalty=1e4)
    assert any(len(set(p)) < len(p) for p in plain)
    for prompt, out in zip(PROMPTS, strong):  # with a huge penalty a token is repeated only once all are used
        assert not set(out[:16 - len(set(prompt))]) & set(prompt)


def test_eos_is_dropped_and_stop_sequences_are_kept():
    model = tiny()
    plain = generate(model, PROMPTS, max_new_tokens=12)
    first = plain[2][0]
    out = generate(model, PROMPTS, max_new_tokens=12, eos_token_id=first)
    for p, o in zip(plain, out):
        assert o == (p[:p.index(first)] if first in p else p)
    assert out[2] == []
    stop = plain[0][2:4]
    out = generate(model, PROMPTS, max_new_tokens=12, stop_sequences=[stop, [99, 98]])
    assert out[0] == plain[0][:4]
    for p, o in zip(plain, out):  # every row stops right after its first occurrence, independently
        ends = [i + 2 for i in range(len(p) - 1) if p[i:i + 2] == stop]
        assert o == p[:ends[0]] if ends else o == p


def test_max_new_tokens_zero_and_tensor_input_and_mode_restored():
    model = tiny().train()
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[]]
    out = generate(model, torch.tensor([[3, 5, 7], [9, 9, 4]]), max_new_tokens=4)
    assert out == generate(model, [[3, 5, 7], [9, 9, 4]], max_new_tokens=4)
    assert generate(model, torch.tensor([3, 5, 7]), max_new_tokens=4) == out[:1]
    assert model.training


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=[]), "no prompts"),
    (dict(input_ids=[[1], []]), "prompt 1 is empty"),
    (dict(input_ids=[1, 2, 3]), "list of prompts"),
    (dict(input_ids=[[1, 16]]), "vocab_size 16"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-2), "top_k"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, do_sample=True), "not both"),
    (dict(stop_sequences=[[]]), "stop sequence"),
    (dict(input_ids=[list(range(10)) * 5]), "longer than the model's context of 48"),
    (dict(input_ids=[[1] * 40], max_new_tokens=9), r"lower max_new_tokens to 8"),
])
def test_bad_inputs_are_config_errors(kwargs, message):
    kwargs = {"input_ids": [[1, 2]], **kwargs}
    with pytest.raises(ConfigError, match=message) as e:
        generate(tiny(), kwargs.pop("input_ids"), **kwargs)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# the `lmforge generate` recipe (load_model mocked)
# ---------------------------------------------------------------------------------------------------


class CharTokenizer:
    chars = "\n abcdefghijklmnopqrstuvwxyz.,!?"
    eos_id = len(chars)
    pad_id = None

    def encode(self, text):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] if i < len(self.chars) else "<|eos|>" for i in ids)


@pytest.fixture
def recipe(monkeypatch):
    import lmforge.recipes.generate as mod

    tok = CharTokenizer()
    net = tiny(vocab=len(tok.chars) + 1, block=32, seed=2)
    calls = []

    def fake_load_pretrained(path, device="cpu"):
        calls.append((path, device))
        return net, tok, {"arch": "gpt"}

    monkeypatch.setattr(mod, "load_model", fake_load_pretrained)
    return mod, net, tok, calls


def test_recipe_greedy_prints_and_returns_prompt_plus_completion(recipe, capsys):
    mod, net, tok, calls = recipe
    texts = mod.generate("runs/x", prompt=["hello", "a"], strategy="greedy", max_new_tokens=10, device="cpu")
    want = [p + tok.decode(o) for p, o in zip(["hello", "a"], generate(
        net, [tok.encode("hello"), tok.encode("a")], max_new_tokens=10, eos_token_id=tok.eos_id))]
    assert texts == want and calls == [("runs/x", torch.device("cpu"))]
    printed = capsys.readouterr().out
    assert all(t in printed for t in texts)


def test_recipe_stop_strings_cut_the_text(recipe):
    mod, net, tok, _ = recipe
    full = mod.generate("m", prompt="the ", strategy="greedy", max_new_tokens=20)[0][4:]
    stop = full[5:7]
    cut = mod.generate("m", prompt="the ", strategy="greedy", max_new_tokens=20, stop=[stop, "zzz"])[0]
    assert cut == "the " + full[:full.index(stop)]


def test_recipe_sampling_seeds_samples_and_empty_prompt(recipe):
    mod, net, tok, _ = recipe
    a = mod.generate("m", prompt=["", "ab"], num_samples=3, seed=1, max_new_tokens=8, top_k=None)
    assert len(a) == 6 and a[3].startswith("ab") and len(set(a[:3])) > 1
    assert mod.generate("m", prompt=["", "ab"], num_samples=3, seed=1, max_new_tokens=8, top_k=None) == a
    # an empty prompt starts from the end-of-text token
    greedy = mod.generate("m", prompt="", strategy="greedy", max_new_tokens=8)[0]
    assert greedy == tok.decode(generate(net, [[tok.eos_id]], max_new_tokens=8, eos_token_id=tok.eos_id)[0])
    beam = mod.generate("m", prompt="ab", strategy="beam", num_beams=3, max_new_tokens=8)[0]
    assert beam == "ab" + tok.decode(generate(net, [tok.encode("ab")], num_beams=3, max_new_tokens=8,
                                              eos_token_id=tok.eos_id)[0])


def test_recipe_prompt_file_and_context_limit(recipe, tmp_path, capsys):
    mod, net, tok, _ = recipe
    f = tmp_path / "p.txt"
    f.write_text("once upon a time\n", encoding="utf-8")
    text = mod.generate("m", prompt_file=str(f), strategy="greedy", max_new_tokens=100)[0]
    assert text.startswith("once upon a time") and not text.startswith("once upon a time\n")
    assert len(tok.encode(text.replace("<|eos|>", "?"))) <= 32  # the prompt + output fit block_size 32
    assert "max_new_tokens lowered from 100 to 16" in capsys.readouterr().err


def test_recipe_bad_inputs(recipe, tmp_path, monkeypatch):
    mod, net, tok, _ = recipe
    with pytest.raises(ConfigError, match="num_samples > 1 needs strategy 'sample'"):
        mod.generate("m", prompt="a", strategy="greedy", num_samples=2)
    with pytest.raises(DataError, match="prompt file not found"):
        mod.generate("m", prompt_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="leaves no room"):
        mod.generate("m", prompt="a" * 40)
    with pytest.raises(ConfigError, match="top_p"):
        mod.generate("m", prompt="a", top_p=2.0)
    monkeypatch.setattr(CharTokenizer, "eos_id", None)
    with pytest.raises(ConfigError, match="empty prompt needs"):
        mod.generate("m")


def test_cli_generate_verb(recipe, capsys):
    from lmforge.cli import main, run_verb

    texts = run_verb("generate", ["runs/x", "--prompt", "hi", "--strategy", "greedy", "--max_new_tokens", "5",
                                  "--device", "cpu"])
    assert len(texts) == 1 and texts[0].startswith("hi")
    assert main(["generate", "runs/x", "--prompt", "hi", "--top_p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the `lmforge generate` recipe on a real transformers directory (no mock: the one loader reads it)
# ---------------------------------------------------------------------------------------------------


def test_recipe_reads_a_transformers_gpt2_directory(tmp_path, capsys):
    """A tiny random GPT2LMHeadModel saved with transformers' save_pretrained, with its tokenizer:
    `lmforge generate DIR` continues prompts token for token as transformers' greedy generate does."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from lmforge.recipes.generate import generate as generate_verb
    from lmforge.text.tokenizer import train_tokenizer

    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello fox", "北京是中国的首都"] * 5
    bpe = train_tokenizer(corpus, kind="bpe", vocab_size=300, min_frequency=1)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.backend, eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=40, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=bpe.eos_id,
                                  eos_token_id=bpe.eos_id)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so that the continuations vary
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "gpt2")
    hf_tok.save_pretrained(tmp_path / "gpt2")

    prompts = ["hello world", "the lazy", "北京"]
    texts = generate_verb(str(tmp_path / "gpt2"), prompt=prompts, strategy="greedy", max_new_tokens=10, device="cpu")
    continuations = []
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([hf_tok(prompt)["input_ids"]])
        new = hf.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=bpe.eos_id,
                          eos_token_id=bpe.eos_id)[0, ids.size(1):].tolist()
        new = new[:new.index(bpe.eos_id)] if bpe.eos_id in new else new
        assert text == prompt + hf_tok.decode(new)
        continuations.append(tuple(new))
    assert len(set(continuations)) > 1 and all(continuations)  # real continuations that depend on the prompt
    assert texts[0] in capsys.readouterr().out


def test_recipe_refuses_an_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.recipes.generate import generate as generate_verb
    from lmforge.text.tokenizer import train_tokenizer

    tok = train_tokenizer(["a small corpus of words"] * 3, kind="wordpiece", vocab_size=40)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    bert.save_pretrained(tmp_path / "bert")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="a BERT encoder does not generate text"):
        generate_verb(str(tmp_path / "bert"), prompt="a", device="cpu")
