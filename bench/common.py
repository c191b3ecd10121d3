"""Shared helpers of the benchmarks: machine description and appending dated results."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_line() -> str:
    import torch

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"torch {torch.__version__}"]
    try:
        import transformers

        versions.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"{', '.join(versions)}, {torch.get_num_threads()} torch threads")


def markdown_table(header: list[str], rows: list[list[object]]) -> list[str]:
    """The lines of a Markdown table: a header row, the separator, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def append_results(title: str, body: str) -> None:
    """Append a dated section to bench/RESULTS.md."""
    today = datetime.date.today().isoformat()
    section = f"\n## {today}: {title}\n\nHardware: {machine_line()}\n\n{body}\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is one run of a script in `bench/`; newest last.\n")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(section)
    print(f"appended to {RESULTS}")
