"""Helpers shared by several test files (import as `from helpers import ...`)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def need_shared(rel: str) -> Path:
    """A file or folder under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"shared data {path} not available")
    return path


@contextlib.contextmanager
def transformers_warnings():
    """Collect what transformers logs at WARNING or above (its load reports are warnings)."""
    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Grab(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
