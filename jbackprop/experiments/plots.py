"""Pictures of a run: learning curves and gradient statistics.

The figures are built with matplotlib's object-oriented API (a bare ``Figure``, no
``pyplot``), so no global figure state is kept and no GUI backend is ever needed. They are
rendered to PNG bytes in memory and written with :func:`jbackprop.io.atomic_write`, so a
crash never leaves a half-written picture. Every PNG carries its title in its ``Title``
text field, so that a file on its own says which run it shows.

Every curve has a marker at each epoch: a run of one epoch is one point per curve, which a
line alone would not draw.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jbackprop.io import atomic_write

__all__ = [
    "grad_stats_figure",
    "learning_curves_figure",
    "plot_grad_stats",
    "plot_learning_curves",
    "png_bytes",
]

DPI = 110
MARKER_SIZE = 4


def learning_curves_figure(history: Sequence[dict], title: str) -> Figure:
    """Cost and accuracy per epoch, training and (when recorded) validation."""
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_cost, ax_acc = fig.subplots(1, 2)
    for split, style, name in (("train", "o-", "training"), ("val", "s--", "validation")):
        if f"{split}_cost" in history[0]:
            cost = [r[f"{split}_cost"] for r in history]
            acc = [100 * r[f"{split}_accuracy"] for r in history]
            ax_cost.plot(epochs, cost, style, markersize=MARKER_SIZE, label=name)
            ax_acc.plot(epochs, acc, style, markersize=MARKER_SIZE, label=name)
    ax_cost.set(xlabel="epoch", ylabel="cost", title="cost")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_cost, ax_acc):
        _epoch_axis(ax)
        ax.legend()
    fig.suptitle(title)
    return fig


def grad_stats_figure(stats: Sequence[dict], title: str) -> Figure:
    """Median per-example gradient norm and gradient noise scale per epoch."""
    epochs = [r["epoch"] for r in stats]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_n, ax_b = fig.subplots(1, 2)
    ax_n.plot(epochs, [r["median_grad_norm"] for r in stats], "o-", markersize=MARKER_SIZE)
    ax_n.set(xlabel="epoch", ylabel="median ‖g_i‖", title="per-example gradient norm")
    ax_b.semilogy(epochs, [r["noise_scale"] for r in stats], "o-", markersize=MARKER_SIZE)
    ax_b.set(xlabel="epoch", ylabel="B_simple (examples)", title="gradient noise scale")
    for ax in (ax_n, ax_b):
        _epoch_axis(ax)
    fig.suptitle(title)
    return fig


def _epoch_axis(ax) -> None:
    """Whole epochs on the x axis (a short run would otherwise get ticks like 0.96)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def png_bytes(fig: Figure) -> bytes:
    """The figure as a PNG file's bytes, its suptitle stored in the PNG's ``Title``."""
    title = fig.get_suptitle()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Title": title} if title else None)
    return buffer.getvalue()


def plot_learning_curves(path: str | Path, history: Sequence[dict], title: str) -> Path:
    """Write :func:`learning_curves_figure` to ``path`` as a PNG; return the path."""
    atomic_write(path, png_bytes(learning_curves_figure(history, title)))
    return Path(path)


def plot_grad_stats(path: str | Path, stats: Sequence[dict], title: str) -> Path:
    """Write :func:`grad_stats_figure` to ``path`` as a PNG; return the path."""
    atomic_write(path, png_bytes(grad_stats_figure(stats, title)))
    return Path(path)
