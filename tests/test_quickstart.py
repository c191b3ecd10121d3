"""quickstart runs the whole path (corpus -> tokenizer -> shards -> GPT -> samples) with no data given."""
from __future__ import annotations

import json

from lmforge.recipes.quickstart import quickstart, stdlib_files


def test_stdlib_corpus_is_real_python_source():
    files = stdlib_files(0.5)
    assert files and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files) >= 0.5e6
    assert not any("test" in f.parts or "encodings" in f.parts for f in files)
    assert files == stdlib_files(0.5)  # deterministic


def test_quickstart_end_to_end_small(tmp_path, capsys):
    out = quickstart(runs_dir=str(tmp_path), max_mb=0.3, vocab_size=300, max_steps=8, seq_len=32, device="cpu")
    run = tmp_path / "quickstart"
    assert out["run_dir"] == str(run)
    assert (run / "checkpoints" / "step-8" / "model.safetensors").is_file()
    assert (run / "loss.png").is_file()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" and r["step"] == 8 for r in rows)
    assert len(out["samples"]) == 3 and out["samples"][0].startswith("def ")
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "perplexity" in printed and "checkpoint" in printed
    # a second run does not overwrite the first
    quickstart(runs_dir=str(tmp_path), max_mb=0.3, vocab_size=300, max_steps=2, seq_len=32, device="cpu")
    assert (tmp_path / "quickstart-2" / "checkpoints" / "step-2").is_dir()
