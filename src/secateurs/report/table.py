"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "human_count", "human_bytes", "before_after_table", "layer_table"]


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} ms"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to width; the first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


_METRICS = [
    ("accuracy", "accuracy", _pct),
    ("params", "params", human_count),
    ("nonzero params", "nonzero_params", human_count),
    ("MACs", "macs", human_count),
    ("nonzero MACs", "nonzero_macs", human_count),
    ("latency", "latency_ms", _ms),
    ("weights on disk", "size_bytes", human_bytes),
]


def _ratio(before: Any, after: Any) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before:
        return "-"
    return f"{after / before:.2f}x"


def before_after_table(columns: dict[str, dict[str, Any]]) -> str:
    """Metrics as rows, one column per model state (e.g. ``before``, ``after``).

    With exactly two columns a third gives the after/before ratio.
    """
    names = list(columns)
    rows = []
    for label, key, fmt in _METRICS:
        values = [columns[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        row = [label] + [fmt(v) for v in values]
        if len(names) == 2:
            row.append(_ratio(values[0], values[1]))
        rows.append(row)
    headers = ["", *names] + (["after/before"] if len(names) == 2 else [])
    return format_table(headers, rows)


def layer_table(layers: list[dict[str, Any]]) -> str:
    rows = [
        [
            layer["name"] or "(root)",
            layer["type"],
            "x".join(map(str, layer["shape"])) or "-",
            human_count(layer["params"]),
            human_count(layer["nonzero"]),
            _pct(1 - layer["nonzero"] / layer["params"]) if layer["params"] else "-",
            human_count(layer["macs"]),
        ]
        for layer in layers
    ]
    return format_table(["layer", "type", "weight shape", "params", "nonzero", "sparsity", "MACs"], rows)
