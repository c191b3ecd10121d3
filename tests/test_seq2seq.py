"""Generation fine-tuning (seq2seq on a GPT): pair readers (tsv, jsonl, two line-aligned gzip files),
the loss on the response only (checked by hand on a tiny example), BLEU equal to sacrebleu called on the
generated lines, exact resume, learning end to end, and every bad input."""
from __future__ import annotations

import gzip
import json
import random
import re
import shutil

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from lmforge.cli import main, run_verb
from lmforge.data.readers import read_pairs
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.base import TaskData
from lmforge.tasks.seq2seq import SEQ2SEQ, Seq2SeqOptions
from lmforge.text.tokenizer import train_tokenizer

WORDS = "red blue green small big dog cat bird runs jumps sleeps".split()
TINY_GPT = ["--arch", "gpt", "--model.n_layer", "2", "--model.n_head", "2", "--model.d_model", "64",
            "--model.block_size", "64", "--model.dropout", "0.0"]


def pairs(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.choices(WORDS, k=rng.randint(2, 6))
        out.append((" ".join(s), " ".join(w.upper() for w in s)))  # 'translation': upper-case each word
    return out


def write_two(prefix, rows, gz=True):
    for suffix, col in (("en", 0), ("de", 1)):
        text = "\n".join(r[col] for r in rows) + "\n"
        path = prefix.parent / f"{prefix.name}.{suffix}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())


@pytest.fixture(scope="module")
def s2s_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("s2s")
    train, dev = pairs(400, 1), pairs(40, 2)
    write_two(d / "train", train)
    write_two(d / "dev", dev, gz=False)
    (d / "train.tsv").write_text("\n".join(f"{a}\t{b}" for a, b in train) + "\n")
    (d / "dev.jsonl").write_text("\n".join(json.dumps({"prompt": a, "response": b}) for a, b in dev) + "\n")
    texts = [a for a, _ in train] + [b for _, b in train]
    train_tokenizer(texts, kind="bpe", vocab_size=300, min_frequency=1).save(d / "tok.json")
    return d


def s2s_args(d, tmp_path, name="run", steps=300, extra=()):
    return ["--task", "seq2seq", "--data.train", str(d / "train"), "--data.dev", str(d / "dev"),
            "--data.source", "en", "--data.target", "de", "--tokenizer", str(d / "tok.json"), *TINY_GPT,
            "--train.max_steps", str(steps), "--train.batch_size", "32", "--train.lr", "3e-3",
            "--train.warmup_steps", "20", "--train.eval_every", "100", "--train.log_every", "1",
            "--train.device", "cpu", "--train.progress", "false", "--train.tensorboard", "false",
            "--name", name, "--runs_dir", str(tmp_path / "runs"), *extra]


def cli_error(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---- reading -----------------------------------------------------------------------------------------
def test_read_pairs_layouts(s2s_data):
    want = pairs(40, 2)
    two = read_pairs(s2s_data / "dev", source="en", target="de")
    assert [(p.prompt, p.response) for p in two] == want
    assert two[3].where == f"{s2s_data / 'dev.en'}:4"
    gz = read_pairs(s2s_data / "train", source="en", target="de")
    assert [(p.prompt, p.response) for p in gz] == pairs(400, 1)
    table = read_pairs(s2s_data / "train.tsv")
    assert [(p.prompt, p.response) for p in table] == pairs(400, 1)
    js = read_pairs(s2s_data / "dev.jsonl")
    assert [(p.prompt, p.response) for p in js] == want
    # prompts only (prediction input): a plain file of lines, or the source side of two files
    assert [p.prompt for p in read_pairs(s2s_data / "dev.en", labelled=False)] == [a for a, _ in want]
    assert [p.response for p in read_pairs(s2s_data / "dev", source="en", target="de", labelled=False)] == [None] * 40


def test_read_real_multi30k():
    from helpers import need_shared

    need_shared("multi30k/train.en.gz")
    prefix = need_shared("multi30k") / "test_2016_flickr"
    rows = read_pairs(prefix, source="en", target="de")
    assert len(rows) == 1000 and rows[0].response and rows[0].where.endswith(".en.gz:1")


@pytest.mark.parametrize("files, kwargs, message", [
    ({"p.en": "a\nb\nc\n", "p.de": "A\nB\n"}, {},
     "p.en has 3 lines but {d}/p.de has 2: line-aligned files must have the same number of lines"),
    ({"p.en": "a\n\nc\n", "p.de": "A\nB\nC\n"}, {}, "p.en:2: empty prompt"),
    ({"p.en": "a\nb\n", "p.de": "A\n \n"}, {}, "p.de:2: empty response"),
    ({"p.en": "a\n"}, {}, "p.de[.gz]: file not found"),
    ({}, {}, "p: file not found (nor"),
])
def test_two_file_errors(tmp_path, files, kwargs, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=re.escape(message.format(d=tmp_path))):
        read_pairs(tmp_path / "p", source="en", target="de", **kwargs)


@pytest.mark.parametrize("name, text, message", [
    ("t.tsv", "hello\tHELLO\n\tX\n", "t.tsv:2: empty prompt"),
    ("t.tsv", "hello\tHELLO\nbye\t \n", "t.tsv:2: empty response"),
    ("t.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n',
     "t.jsonl:2: no key 'response' for data.target (the response)"),
    ("t.en", "a\nb\n", "a plain text file holds prompts only"),
])
def test_table_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        read_pairs(path)


# ---- features and the loss on the response only, by hand ---------------------------------------------
def test_features_and_loss_only_on_response(s2s_data):
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.task_model import TaskModel
    from lmforge.text.tokenizer import Tokenizer

    tok = Tokenizer.load(s2s_data / "tok.json")
    eos = tok.eos_id
    examples = read_pairs(s2s_data / "dev.jsonl")[:3]
    feats, stats = SEQ2SEQ.featurize(examples, tok, [], TaskData(max_length=64))
    for ex, f in zip(examples, feats):
        p, r = tok.encode(ex.prompt), tok.encode(ex.response)
        # [bos] prompt [sep] response [eos]; BPE: bos = sep = eos = <|endoftext|>
        assert f["input_ids"] == [eos] + p + [eos] + r + [eos]
        assert f["labels"] == [-100] * (len(p) + 2) + r + [eos]
        assert f["prompt_len"] == len(p) + 2
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, d_model=32))
    model = TaskModel(gpt, SEQ2SEQ.head(32, 0, Seq2SeqOptions()))
    batch = SEQ2SEQ.collate(feats, tok.pad_id)
    loss, _ = SEQ2SEQ.loss(model, batch)
    logits = gpt(batch["input_ids"])  # the plain LM
    terms = []
    for b, f in enumerate(feats):
        for t in range(f["prompt_len"], len(f["input_ids"])):  # only response tokens (and eos) are targets
            terms.append(-F.log_softmax(logits[b, t - 1].float(), -1)[f["input_ids"][t]])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert len(terms) == sum(len(tok.encode(e.response)) + 1 for e in examples)
    # the -100 labels are what keep the prompt out: giving a prompt position a target changes the loss
    batch2 = {k: v.clone() for k, v in batch.items()}
    batch2["labels"][0, 1] = 5
    assert SEQ2SEQ.loss(model, batch2)[0].item() != pytest.approx(loss.item())
    assert stats.truncated == 0


def test_truncation_keeps_the_separator_and_counts(s2s_data):
    from lmforge.data.readers import Pair
    from lmforge.text.tokenizer import Tokenizer

    tok = Tokenizer.load(s2s_data / "tok.json")
    long = " ".join(["red dog"] * 20)
    ex = [Pair(long, long.upper(), "x"), Pair(long, None, "y")]
    feats, stats = SEQ2SEQ.featurize(ex, tok, [], TaskData(max_length=16))
    assert stats.truncated == 2
    assert len(feats[0]["input_ids"]) == 16 and feats[0]["prompt_len"] == 8
    assert feats[0]["input_ids"][7] == tok.eos_id  # the separator is kept
    assert len(feats[1]["input_ids"]) == 15 and feats[1]["input_ids"][-1] == tok.eos_id  # room for one token


# ---- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s2s_run(s2s_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2srun")
    summary = run_verb("finetune", s2s_args(s2s_data, tmp))
    return tmp / "runs" / "run", summary


def test_seq2seq_learns_and_bleu_equals_sacrebleu(s2s_data, s2s_run, tmp_path):
    run, summary = s2s_run
    assert summary["best"]["value"] >= 30  # upper-casing words is learnable in a few hundred steps (random: ~0)
    # the run was trained on two files (source/target = en/de); a jsonl names its keys
    report = run_verb("evaluate", [str(run), "--data", str(s2s_data / "dev.jsonl"), "--out", str(tmp_path / "rep"),
                                   "--read.source", "prompt", "--read.target", "response"])
    m = report["metrics"]
    assert m["bleu"] == pytest.approx(summary["best"]["value"])  # the jsonl and the two files hold the same pairs
    assert m["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert m["ref_ppl"] > 1 and m["ref_tokens"] > 40
    assert "signature: `nrefs:1" in (tmp_path / "rep" / "report.md").read_text()
    # predict: one generated line per prompt; sacrebleu on those lines gives the report's BLEU
    run_verb("predict", [str(run), "--data", str(s2s_data / "dev.en"), "--out", str(tmp_path / "hyp.txt")])
    hyps = (tmp_path / "hyp.txt").read_text().splitlines()
    refs = [b for _, b in pairs(40, 2)]
    assert len(hyps) == 40
    assert sacrebleu.corpus_bleu(hyps, [refs]).score == pytest.approx(m["bleu"], abs=1e-9)
    run_verb("predict", [str(run), "--data", str(s2s_data / "dev.jsonl"), "--out", str(tmp_path / "p.jsonl")])  # inputs
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["generated"] for r in rows] == hyps and rows[0]["prompt"] == pairs(40, 2)[0][0]
    # beam search through --task_args: a valid report, same references
    beam = run_verb("evaluate", [str(run), "--data", str(s2s_data / "dev"), "--read.source", "en", "--read.target",
                                 "de", "--out", str(tmp_path / "beam"), "--task_args.num_beams", "3"])
    assert beam["settings"]["task_args"]["num_beams"] == 3 and 0 <= beam["metrics"]["bleu"] <= 100
    assert beam["metrics"]["ref_loss"] == pytest.approx(m["ref_loss"])  # the references' loss does not depend on decoding


def test_generation_matches_generate_called_directly(s2s_data, s2s_run):
    from lmforge.generation import generate
    from lmforge.tasks import load_task_model

    run, _ = s2s_run
    model = load_task_model(run)
    prompts = [a for a, _ in pairs(5, 9)]
    outs = model.predict([{"prompt": p} for p in prompts])
    tok = model.tokenizer
    eos = tok.eos_id
    inputs = [[eos] + tok.encode(p) + [eos] for p in prompts]
    new = min(64, 64 - max(map(len, inputs)))  # the default max_new_tokens, capped by the 64-token context
    ids = generate(model.model.backbone, inputs, max_new_tokens=new, eos_token_id=eos, pad_token_id=eos)
    assert [o["generated"] for o in outs] == [tok.decode(i, skip_special_tokens=True).strip() for i in ids]


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_resume_is_exact(s2s_data, tmp_path):
    # 400 examples / 32 = 13 steps an epoch: resume from step 9 (mid-epoch), past an epoch end
    extra = ("--train.save_every", "9", "--train.keep_checkpoints", "10", "--train.eval_every", "10")
    run_verb("finetune", s2s_args(s2s_data, tmp_path, "full", steps=20, extra=extra))
    full, cut = tmp_path / "runs" / "full", tmp_path / "runs" / "cut"
    shutil.copytree(full, cut)
    for step in (18, 20):
        shutil.rmtree(cut / "checkpoints" / f"step-{step}", ignore_errors=True)
    shutil.rmtree(cut / "best")
    run_verb("finetune", s2s_args(s2s_data, tmp_path, "cut", steps=20, extra=extra + ("--resume", "latest")))
    assert train_losses(cut) == train_losses(full)
    a = (full / "checkpoints" / "step-20" / "model.safetensors").read_bytes()
    assert a == (cut / "checkpoints" / "step-20" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"--task_args.num_beams": "0"}, "task_args.num_beams must be at least 1"),
    ({"--task_args.max_new_tokens": "0"}, "task_args.max_new_tokens must be at least 1"),
    ({"--task_args.bleu_tokenize": "moses"}, "task_args.bleu_tokenize 'moses' is not one of sacrebleu's"),
    ({"--data.text_pair": "x"}, "data.text_pair does not apply to seq2seq"),
    ({"--arch": "bert", "--model.block_size": None}, "task seq2seq generates text: it needs a causal language model"),
    ({"--data.target": "fr"}, "train.fr[.gz]: file not found"),
])
def test_bad_seq2seq_config(s2s_data, tmp_path, capsys, change, message):
    args = s2s_args(s2s_data, tmp_path, steps=2)
    for key, value in change.items():
        i = args.index(key) if key in args else None
        if value is None:
            del args[i:i + 2]
        elif i is not None:
            args[i + 1] = value
        else:
            args += [key, value]
    assert message in cli_error(["finetune", *args], capsys)


def test_tokenizer_without_end_token_is_refused(s2s_data, tmp_path, capsys):
    from lmforge.text.tokenizer import build_char

    text = " ".join(WORDS) + " " + " ".join(WORDS).upper()
    build_char(sorted(set(text))).save(tmp_path / "char.json")
    args = s2s_args(s2s_data, tmp_path, steps=2)
    args[args.index("--tokenizer") + 1] = str(tmp_path / "char.json")
    assert "needs a tokenizer with an end-of-text token" in cli_error(["finetune", *args], capsys)


def test_options_check():
    with pytest.raises(ConfigError, match="num_beams"):
        Seq2SeqOptions(num_beams=0)
    assert SEQ2SEQ.options({"num_beams": 4}).num_beams == 4
