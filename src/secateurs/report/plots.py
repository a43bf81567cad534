"""Figures as PNG bytes (matplotlib, headless), for reports and the sensitivity command."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from ..io.arch import require

__all__ = ["bars_png", "history_png", "scatter_png", "sensitivity_png", "widths_png"]


def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    # matplotlib's object API with the Agg canvas: no pyplot, so a caller's backend
    # (Jupyter, an interactive window) is left alone and nothing needs a display.
    require("matplotlib", "report")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return None, fig, fig.subplots()


def _png(_: Any, fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def sensitivity_png(result: dict[str, Any], *, max_curves: int = 24) -> bytes:
    """The metric of each unit against its pruning ratio (the most sensitive units first)."""
    plt, fig, ax = _figure(8, 4.5)
    metric = result["metric"]
    curves = result["curves"]
    final = [(c[metric] if c.get(metric) else c["loss"]) for c in curves]
    worse = (lambda v: v[0] - v[-1]) if metric in ("accuracy", "agreement") else (lambda v: v[-1] - v[0])
    ranked = sorted(range(len(curves)), key=lambda i: -worse(final[i]))[:max_curves]
    for i in ranked:
        c = curves[i]
        ax.plot(c["ratios"], final[i], marker="o", markersize=3, linewidth=1, label=c["name"][:40])
    ax.set_xlabel("fraction removed from this unit alone")
    ax.set_ylabel(metric)
    ax.set_title(f"sensitivity ({result['method']}, {len(curves)} units; {len(ranked)} most sensitive shown)")
    ax.grid(alpha=0.3)
    if len(ranked) <= 12:
        ax.legend(fontsize=6, loc="best")
    return _png(plt, fig)


def widths_png(names: Sequence[str], before: Sequence[float], after: Sequence[float], *, ylabel: str,
               title: str, labels: tuple[str, str] = ("before", "after")) -> bytes:
    """Per-layer bars: the first series light and wide, the second dark and narrow in front."""
    plt, fig, ax = _figure(max(6.0, min(18.0, 0.25 * len(names) + 3)), 4.0)
    xs = range(len(names))
    ax.bar(xs, before, color="#c6dbef", label=labels[0])
    ax.bar(xs, after, color="#2171b5", label=labels[1], width=0.6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([n[-24:] for n in names], rotation=90, fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _png(plt, fig)


def bars_png(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str) -> bytes:
    """Horizontal bars, e.g. a histogram of importance scores or a before/after summary."""
    plt, fig, ax = _figure(7, max(2.5, 0.3 * len(labels) + 1))
    ax.barh(range(len(labels)), values, color="#2171b5")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.invert_yaxis()
    return _png(plt, fig)


def history_png(history: Sequence[dict[str, Any]]) -> bytes:
    """Training curves: loss and accuracy per epoch (train and held-out)."""
    plt, fig, ax = _figure(7, 3.5)
    epochs = [h["epoch"] for h in history]
    for key, style in (("train_loss", "-"), ("val_loss", "--")):
        if all(key in h for h in history):
            ax.plot(epochs, [h[key] for h in history], style, color="#cb181d", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    acc = ax.twinx()
    for key, style in (("train_accuracy", "-"), ("val_accuracy", "--")):
        if all(key in h for h in history):
            acc.plot(epochs, [h[key] for h in history], style, color="#2171b5", label=key)
    acc.set_ylabel("accuracy")
    lines = ax.get_lines() + acc.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    ax.set_title("training")
    return _png(plt, fig)


def scatter_png(points: dict[str, tuple[float, float]], *, xlabel: str, ylabel: str, title: str) -> bytes:
    """Labelled points, e.g. accuracy against MACs for several variants."""
    plt, fig, ax = _figure(7, 4)
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=30)
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(plt, fig)
