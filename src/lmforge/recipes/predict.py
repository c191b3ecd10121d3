"""`lmforge predict MODEL --data FILE --out preds.jsonl`: a fine-tuned model's predictions, one JSON
object per input: the label with its probability and every label's probability (classify, pair), the
words, their IOB2 tags and the entities with character offsets (tag), the answer with its probability,
character offsets and the n best candidates (qa), or the generated text (seq2seq; with an --out that is
not .jsonl, one generated text per line, as sacrebleu reads hypotheses)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lmforge.errors import ConfigError, DataError


def predict(
    model: str,
    data: str,
    out: str,
    read: Optional[dict[str, Any]] = None,
    task_args: Optional[dict[str, Any]] = None,
    batch_size: int = 32,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Predict with a fine-tuned model and write one JSON line per input.

    Args:
        model: a fine-tuned run (its best checkpoint) or checkpoint directory.
        data: a .jsonl file of {"text": ...} (pair: also "text_pair"; tag: or "words": [...]) objects, or a
            file in the task's own training format (labels, if present, are ignored).
        out: the output .jsonl file.
        read: overrides of how a task-format file is read (`--read.text 0 --read.header false`).
        task_args: decoding options for this run (qa: `--task_args.n_best 10`; seq2seq: `--task_args.num_beams 4`).
        batch_size: examples per forward pass.
        device: 'auto', 'cpu', 'cuda', ...
        overwrite: replace an existing output file.
    """
    import dataclasses

    from lmforge.recipes.evaluate import _pair_prefix, set_task_args
    from lmforge.storage import atomic_write_text, check_output
    from lmforge.tasks.base import Predictor, TaskData
    from lmforge.train.trainer import resolve_device

    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    path = Path(data)
    if not path.is_file() and not _pair_prefix(data):
        raise DataError(f"{path}: file not found")
    out_path = check_output(out, overwrite=overwrite, kind="file")
    pred = Predictor.load(model, resolve_device(device))
    set_task_args(pred, task_args)
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        from lmforge.data.readers import read_json_objects

        inputs = read_json_objects(path)  # {"text": ..., "text_pair": ...} / {"words": [...]} objects
        results = pred.predict(inputs, batch_size=batch_size)
        echo = inputs
    else:
        unknown = set(read or {}) - set(TaskData.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"read.{sorted(unknown)[0]}: not a reading option")
        cfg = dataclasses.replace(pred.data, **(read or {}))
        examples = pred.record.read(str(path), cfg, labelled=False)
        if pred.task == "tag":
            inputs = [{"words": list(ex.words)} for ex in examples]
        elif pred.task == "qa":
            inputs = [{"id": ex.id, "question": ex.question, "context": ex.context} for ex in examples]
        elif pred.task == "seq2seq":
            inputs = [{"prompt": ex.prompt} for ex in examples]
        else:
            inputs = [{"text": ex.text, **({"text_pair": ex.text_pair} if ex.text_pair is not None else {})}
                      for ex in examples]
        results = pred.predict(inputs, batch_size=batch_size)
        echo = inputs
    if pred.task == "seq2seq" and not out_path.name.endswith(".jsonl"):  # plain hypotheses, one per line
        lines = [" ".join(r["generated"].split()) for r in results]
        atomic_write_text(out_path, "\n".join(lines) + "\n")
        print(f"{len(lines):,} generated lines -> {out_path}", flush=True)
        return {"out": str(out_path), "n": len(lines)}
    lines = [json.dumps({**({"text": i["text"]} if "text" in i else {}),
                         **({"text_pair": i["text_pair"]} if "text_pair" in i else {}), **r}, ensure_ascii=False)
             for i, r in zip(echo, results)]
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    print(f"{len(lines):,} predictions -> {out_path}", flush=True)
    return {"out": str(out_path), "n": len(lines)}
