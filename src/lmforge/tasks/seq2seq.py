"""Generation fine-tuning on a causal LM (GPT): `[bos] prompt [sep] response [eos]`, the loss on the
response (and its end token) only; evaluation by generating from `[bos] prompt [sep]` (greedy or beam
search with the KV cache of `lmforge.generation`), scored with corpus BLEU exactly as sacrebleu scores it
(its signature goes in the report), plus the loss and perplexity of the reference responses.

Files (`lmforge.data.readers.read_pairs`): a tsv/csv/jsonl of prompt/response columns, or two line-aligned
files PATH.SRC / PATH.TGT (gzip allowed), e.g. `--data.train multi30k/train --data.source en --data.target de`.
Prompt and response are tokenized separately and joined with the separator's tokens (so the prompt at
inference is token for token the prompt of training). Examples are length-grouped into batches by
`TaskBatcher` (little padding); right padding needs no attention mask in a causal model.

A sequence longer than `data.max_length` is cut (and counted): the prompt part keeps at least half the
length (its start), the response the rest. A prompt to generate from keeps at most max_length - 1 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import from_dict
from lmforge.data.task_batches import pad_to
from lmforge.errors import ConfigError, DataError
from lmforge.tasks.base import FeatureStats, TaskData, backbone_of


@dataclass
class Seq2SeqOptions:
    """Decoding and scoring (`--task_args.*`; evaluate/predict can change them).

    Args:
        num_beams: 1 = greedy decoding; more = beam search with that many beams.
        max_new_tokens: the longest generated response (also capped by the model's context).
        length_penalty: beam search ranks finished hypotheses by log p / length ** length_penalty.
        bleu_tokenize: sacrebleu's tokenizer for BLEU ('13a' default; 'intl', 'zh', 'char', 'none', ...).
    """

    num_beams: int = 1
    max_new_tokens: int = 64
    length_penalty: float = 1.0
    bleu_tokenize: str = "13a"

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"task_args.num_beams must be at least 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"task_args.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        from sacrebleu.metrics.bleu import BLEU

        if self.bleu_tokenize not in BLEU.TOKENIZERS:
            raise ConfigError(f"task_args.bleu_tokenize {self.bleu_tokenize!r} is not one of sacrebleu's: "
                              f"{', '.join(BLEU.TOKENIZERS)}")


class Seq2SeqHead(nn.Module):
    """No weights of its own: the backbone's LM head makes the logits. Holds the decoding options and
    (after `bind`) the tokenizer, whose end token stops generation and which turns tokens into text."""

    def __init__(self, options: Seq2SeqOptions):
        super().__init__()
        self.options = options
        self.tokenizer = None

    def forward(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return hidden  # (B, T, d_model): the loss applies the LM head to the response positions only


def _special(tokenizer, data: TaskData) -> tuple[list[int], list[int], int]:
    """(prefix ids: [bos] or [], separator ids, end id) for this tokenizer and data config."""
    eos = tokenizer.eos_id
    if eos is None:
        raise ConfigError("task seq2seq needs a tokenizer with an end-of-text token (e.g. <|endoftext|>) to end "
                          "responses; train a bpe tokenizer")
    bos = tokenizer.bos_id
    if data.separator == "auto":
        sep = [tokenizer.sep_id] if tokenizer.sep_id is not None else [eos]
    else:
        sep = tokenizer.encode(data.separator)
        if not sep:
            raise ConfigError(f"data.separator {data.separator!r} tokenizes to nothing")
    return ([bos] if bos is not None else []), sep, eos


class Seq2SeqMetric:
    """Corpus BLEU (`lmforge.metrics.CorpusBLEU`, sacrebleu's statistics summed) and the token-level
    loss / perplexity of the reference responses (end token included)."""

    def __init__(self):
        self.bleu = None
        self.nll = 0.0
        self.tokens = 0

    def describe(self) -> str:
        return self.bleu.describe() if self.bleu is not None else "corpus BLEU by sacrebleu"

    def update(self, hypotheses: Sequence[str], references: Sequence[str], nll: float, tokens: int,
               tokenize: str) -> None:
        from lmforge.metrics import CorpusBLEU

        if self.bleu is None:
            self.bleu = CorpusBLEU(tokenize=tokenize)
        self.bleu.update(hypotheses, references)
        self.nll += nll
        self.tokens += tokens

    def compute(self) -> dict[str, Any]:
        import math

        from lmforge.metrics import CorpusBLEU

        out = (self.bleu or CorpusBLEU()).compute()
        if self.tokens:
            loss = self.nll / self.tokens
            out.update(ref_loss=loss, ref_ppl=math.exp(min(loss, 50.0)), ref_tokens=self.tokens)
        return out


class Seq2SeqTask:
    name = "seq2seq"
    default_metric = "bleu"
    default_max_length = 128
    backbone_heads = ("lm",)
    reports_perplexity = False

    # -- reading -------------------------------------------------------------------------------
    def options(self, values: dict[str, Any] | None) -> Seq2SeqOptions:
        return from_dict(Seq2SeqOptions, values, "task_args")

    def check_data(self, data: TaskData) -> None:
        if data.text_pair is not None:
            raise ConfigError("data.text_pair does not apply to seq2seq: give the prompt and response as "
                              "data.source and data.target")

    def check_model(self, arch: str, backbone: nn.Module, options) -> None:
        if not (hasattr(backbone, "lm_head") and hasattr(backbone, "new_cache")):
            raise ConfigError(f"task seq2seq generates text: it needs a causal language model (gpt), not {arch}")

    def read(self, path: str, data: TaskData, labelled: bool = True) -> list:
        from lmforge.data.readers import read_pairs

        return read_pairs(path, source=data.source, target=data.target, header=data.header, labelled=labelled)

    def label_names(self, examples: Sequence, path: str = "training split") -> list[str]:
        if not examples:
            raise DataError(f"{path}: no examples (empty split)")
        return []

    def check_labels(self, examples: Sequence, labels: list[str], path: str) -> None:
        if not examples:
            raise DataError(f"{path}: no examples (empty split)")

    def examples_from(self, inputs: Sequence[dict[str, Any]], data: TaskData) -> list:
        from lmforge.data.readers import Pair

        out = []
        for i, item in enumerate(inputs):
            text = item.get("prompt", item.get("text")) if isinstance(item, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"input {i}: 'prompt' (or 'text') must be a non-empty string")
            out.append(Pair(text.strip(), None, f"input {i}"))
        return out

    def bind(self, model: nn.Module, tokenizer) -> None:
        model.head.tokenizer = tokenizer

    # -- features and batches ------------------------------------------------------------------
    def featurize(self, examples: Sequence, tokenizer, labels: list[str] | None, data: TaskData):
        """input_ids = [bos] prompt sep response eos; labels = the same ids on the response and eos, -100
        elsewhere (the loss is on the response only); prompt_len = tokens before the response."""
        prefix, sep, eos = _special(tokenizer, data)
        prompts = tokenizer.encode_batch([ex.prompt for ex in examples])
        labelled = [ex for ex in examples if ex.response is not None]
        responses = iter(tokenizer.encode_batch([ex.response for ex in labelled]))
        limit = data.max_length
        stats = FeatureStats(examples=len(examples))
        features = []
        for ex, p in zip(examples, prompts):
            head = prefix + p  # the separator always stays: it tells the model the response starts
            if ex.response is None:
                if len(head) + len(sep) > limit - 1:
                    head = head[: max(1, limit - 1 - len(sep))]
                    stats.truncated += 1
                ids = head + sep
                features.append({"input_ids": ids, "labels": [-100] * len(ids), "prompt_len": len(ids)})
                continue
            r = next(responses) + [eos]
            if len(head) + len(sep) + len(r) > limit:
                stats.truncated += 1
                keep = max(limit - len(r), limit // 2) - len(sep)
                head = head[: max(1, keep)]
                r = r[: max(0, limit - len(head) - len(sep))]
            prompt = head + sep
            features.append({"input_ids": prompt + r, "labels": [-100] * len(prompt) + r, "prompt_len": len(prompt)})
        return features, stats

    def collate(self, features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
        # right padding: in a causal model no real token sees the padding after it, so no attention mask
        ids = pad_to([f["input_ids"] for f in features], pad_id)
        return {"input_ids": ids, "labels": pad_to([f["labels"] for f in features], -100, ids.shape[1]),
                "prompt_len": torch.tensor([f["prompt_len"] for f in features], dtype=torch.long)}

    # -- model ---------------------------------------------------------------------------------
    def head(self, d_model: int, n_labels: int, options: Seq2SeqOptions, labels: Sequence[str] | None = None) -> nn.Module:
        return Seq2SeqHead(options)

    @staticmethod
    def _token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token NLL of the response tokens (N,), their row index (N,)): position t predicts token t + 1."""
        hidden = model(batch)[:, :-1]  # (B, T - 1, d)
        targets = batch["labels"][:, 1:]  # (B, T - 1)
        mask = targets >= 0
        logits = backbone_of(model).lm_head(hidden[mask])  # (N, vocab): the response positions only
        nll = F.cross_entropy(logits.float(), targets[mask], reduction="none")
        rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[mask]
        return nll, rows

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        nll, _ = self._token_nll(model, batch)
        return nll.mean(), {"loss_items": nll.new_tensor(nll.numel())}

    @torch.no_grad()
    def decode(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """Per example: the generated text and, when labelled, the summed NLL and count of its reference
        tokens; with the sum over examples of their mean token NLL."""
        from lmforge.generation import generate

        head = model.head
        tok, opts = head.tokenizer, head.options
        if tok is None:
            raise RuntimeError("seq2seq head has no tokenizer: call the task's bind(model, tokenizer) first")
        B = batch["input_ids"].shape[0]
        nll_sum, counts = [0.0] * B, [0] * B
        loss = None
        if bool((batch["labels"] >= 0).any()):
            nll, rows = self._token_nll(model, batch)
            nll_sum = torch.zeros(B, device=nll.device).index_add_(0, rows, nll).tolist()
            counts = torch.bincount(rows, minlength=B).tolist()
            loss = sum(s / c for s, c in zip(nll_sum, counts) if c)
        ids = batch["input_ids"].tolist()
        prompts = [row[:n] for row, n in zip(ids, batch["prompt_len"].tolist())]
        backbone = backbone_of(model)
        new = opts.max_new_tokens
        limit = getattr(backbone, "max_seq_len", None)
        if limit is not None:
            new = max(1, min(new, limit - max(len(p) for p in prompts)))
        eos = tok.eos_id
        out = generate(backbone, prompts, max_new_tokens=new, num_beams=opts.num_beams,
                       length_penalty=opts.length_penalty, eos_token_id=eos,
                       pad_token_id=tok.pad_id if tok.pad_id is not None else eos)
        texts = [t.strip() for t in tok.decode_batch(out, skip_special_tokens=True)]
        return [{"text": t, "nll": s, "tokens": c, "tokenize": opts.bleu_tokenize}
                for t, s, c in zip(texts, nll_sum, counts)], loss

    # -- scoring and output --------------------------------------------------------------------
    def metric(self, labels: list[str]):
        return Seq2SeqMetric()

    def update(self, metric, predictions: Sequence, examples: Sequence, labels: list[str]) -> None:
        if not predictions:
            return
        metric.update([p["text"] for p in predictions], [ex.response for ex in examples],
                      sum(p["nll"] for p in predictions), sum(p["tokens"] for p in predictions),
                      predictions[0]["tokenize"])

    def output(self, prediction, example, labels: list[str]) -> dict[str, Any]:
        return {"prompt": example.prompt, "generated": prediction["text"]}


SEQ2SEQ = Seq2SeqTask()
