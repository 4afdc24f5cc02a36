"""PNG plots of `q4c diff --tensors` results (matplotlib, an optional extra: `pip install 'q4c[plot]'`).

Drawn with matplotlib's Agg canvas directly (no pyplot), so no global backend or figure state is
touched and nothing needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from q4c.errors import ConfigError
from q4c.graph import atomic_write

#: where identical tensors (infinite SQNR) are drawn, above the highest finite value
_INF_HEADROOM_DB = 10.0
#: up to this many tensors, the x axis names each one's op
_MAX_OP_LABELS = 60


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install 'q4c[plot]' (or pip install matplotlib)") from e
    return Figure, FigureCanvasAgg


def plot_diff(doc: Mapping[str, Any], path: str | os.PathLike[str], title: str = "") -> None:
    """Write a PNG: SQNR per tensor along the graph (top), and per time step of every recurrent
    layer's hidden state (bottom, when the model has one). `doc` is a `q4c.diff/1` document
    made with tensors=True. The file is written atomically."""
    if "tensors" not in doc:
        raise ConfigError("plotting needs the per-tensor comparison (diff with tensors=True)")
    Figure, FigureCanvasAgg = _matplotlib()
    recurrent = doc.get("recurrent") or {}
    rows = 2 if recurrent else 1
    fig = Figure(figsize=(12, 4.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    _plot_tensors(axes[0], doc)
    if recurrent:
        _plot_steps(axes[1], recurrent)
    if title:
        fig.suptitle(title, fontsize=12)
    path = Path(path)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _plot_tensors(ax: Any, doc: Mapping[str, Any]) -> None:
    tensors = doc["tensors"]
    values = [t["sqnr_db"] for t in tensors]
    finite = [v for v in values if math.isfinite(v)]
    cap = (max(finite) if finite else 0.0) + _INF_HEADROOM_DB
    xs = list(range(len(tensors)))
    ys = [v if math.isfinite(v) else cap for v in values]
    # the line joins only the tensors that differ: identical ones (e.g. untouched shape arithmetic)
    # would otherwise saw-tooth to the top and hide the trend of the error
    ax.plot([x for x, v in zip(xs, values) if math.isfinite(v)], finite, color="0.6", linewidth=1, zorder=1)
    exact = [(x, y) for x, y, v in zip(xs, ys, values) if not math.isfinite(v)]
    noisy = [(x, y) for x, y, v in zip(xs, ys, values) if math.isfinite(v)]
    if exact:
        ax.scatter(*zip(*exact), marker="^", color="tab:green", s=22, zorder=2, label="identical (inf dB)")
    if noisy:
        ax.scatter(*zip(*noisy), color="tab:blue", s=18, zorder=2, label="differs")
    first = doc.get("first_error")
    if first is not None:
        index = next(i for i, t in enumerate(tensors) if t["name"] == first["name"])
        ax.axvline(index, color="tab:red", linestyle="--", linewidth=1)
        ax.annotate(f"first error: {_short(first['name'])} ({first['op']}, {first['sqnr_db']} dB)",
                    xy=(index, ys[index]), xytext=(8, 10), textcoords="offset points", color="tab:red", fontsize=9)
    if finite:
        worst = min(range(len(values)), key=lambda i: values[i])
        ax.annotate(f"min: {_short(tensors[worst]['name'])} ({tensors[worst]['op']}, {values[worst]} dB)",
                    xy=(worst, ys[worst]), xytext=(-8, 10), textcoords="offset points", ha="right", fontsize=9)
    for name, m in doc["outputs"].items():
        if math.isfinite(m["sqnr_db"]):
            ax.axhline(m["sqnr_db"], color="tab:orange", linestyle=":", linewidth=1)
            ax.annotate(f"output {name}: {m['sqnr_db']} dB", xy=(0, m["sqnr_db"]), xytext=(2, 3),
                        textcoords="offset points", color="tab:orange", fontsize=9)
    labelled = 0 < len(tensors) <= _MAX_OP_LABELS
    if labelled:
        ax.set_xticks(xs, [f"{i} {t['op']}" for i, t in enumerate(tensors)], rotation=90, fontsize=8)
    if exact:
        low, high = ax.get_ylim()
        ticks = [t for t in ax.get_yticks() if low <= t < cap - _INF_HEADROOM_DB / 2]
        ax.set_yticks([*ticks, cap], [f"{t:g}" for t in ticks] + ["inf"])
        ax.set_ylim(low, high)
    ax.set_xlabel("tensor in graph order of the reference model" + (" (index, producing op)" if labelled else " (index)"))
    ax.set_ylabel("SQNR vs reference (dB)")
    ax.set_title(f"Per-tensor SQNR along the graph ({len(tensors)} tensors compared)", fontsize=11)
    ax.set_xlim(-0.5, max(len(tensors) - 0.5, 0.5))
    ax.grid(True, alpha=0.3)
    if exact or noisy:
        ax.legend(loc="upper right", fontsize=9)


def _plot_steps(ax: Any, recurrent: Mapping[str, Any]) -> None:
    finite = [v for r in recurrent.values() for v in r["per_step_sqnr_db"] if math.isfinite(v)]
    cap = (max(finite) if finite else 0.0) + _INF_HEADROOM_DB
    for node, r in recurrent.items():
        ys = [v if math.isfinite(v) else cap for v in r["per_step_sqnr_db"]]
        ax.plot(range(len(ys)), ys, linewidth=1.2, label=f"{node} ({r['op']})")
    ax.set_xlabel("time step")
    ax.set_ylabel("hidden-state SQNR (dB)")
    ax.set_title("Recurrent layers: hidden-state SQNR per time step (all directions and batch entries pooled)",
                 fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
