"""The compile report's Pareto curve (predicted and measured damage vs weight bytes) as a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from q4c.errors import ConfigError


def plot_pareto(points: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> None:
    """Predicted (sum of per-tensor sensitivities) and measured (all tensors quantized at once)
    output damage against the bytes each budget's plan uses."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plotting needs matplotlib: pip install 'q4c[plot]'") from e
    if not points:
        raise ConfigError("no Pareto curve to plot: it exists for budgeted (sensitivity-guided) plans only")
    kib = [p["used_bytes"] / 1024 for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot(kib, [p["predicted"] for p in points], "o--", label="predicted (sum of per-tensor scores)")
    if all("measured" in p for p in points):
        ax.plot(kib, [p["measured"] for p in points], "s-", label="measured (whole plan)")
    for p, x in zip(points, kib, strict=True):
        ax.annotate(f"{p['avg_bits']:g} b", (x, p["predicted"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("quantized weight bytes (KiB)")
    ax.set_ylabel("output damage (KL or normalized MSE)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "precision budget vs output damage")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
