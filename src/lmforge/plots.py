"""The one way lmforge draws a figure and writes it: a matplotlib `Figure` on the Agg canvas (no
pyplot state, no display needed), saved as PNG through an atomic write."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def new_figure(width: float = 7.0, height: float = 4.5) -> tuple[Any, Any]:
    """(figure, axes) of a fresh Agg figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def png_bytes(fig: Any, *, grid: bool = True, legend: bool = True) -> bytes:
    """The figure as PNG bytes (grid and legend on its axes, tight layout)."""
    for ax in fig.axes:
        if grid:
            ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(fig: Any, path: str | Path, **kw: Any) -> Path:
    """Write the figure to `path` atomically (see `png_bytes` for the keywords)."""
    from lmforge.storage import atomic_write_bytes

    return atomic_write_bytes(path, png_bytes(fig, **kw))
