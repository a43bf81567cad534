"""Plain-text tables for the terminal."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "human_count", "human_bytes", "before_after_table", "layer_table", "skipped_summary"]


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


def _latency(column: dict[str, Any]) -> str:
    """The median, and the middle half of the samples when they were recorded: ``1.234 ms (1.201-1.310)``."""
    median, iqr = column.get("latency_ms"), column.get("latency_iqr_ms")
    if median is None or not isinstance(iqr, (list, tuple)) or len(iqr) != 2:
        return _ms(median)
    return f"{median:.3f} ms ({iqr[0]:.3f}-{iqr[1]:.3f})"


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
        if key == "latency_ms" and any(columns[n].get("latency_iqr_ms") for n in names):
            row = ["latency, median (IQR)"] + [_latency(columns[n]) for n in names]
        else:
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


_DETAIL = re.compile(r"\s*\([^()]*\)")  # a parenthesised detail, innermost first


def _reason_kind(reason: str) -> str:
    """A reason without its parenthesised details (which name the tensor, the error, a count)."""
    while True:
        shorter = _DETAIL.sub("", reason)
        if shorter == reason:
            return reason.strip() or "unknown"
        reason = shorter


def skipped_summary(skipped: dict[str, str], *, names: int = 3, kinds: int = 6, inline: int = 4) -> list[str]:
    """What a pruning run left dense, in a few lines: a count by reason and the first few names of each.

    ``skipped`` maps a tensor (or group, or call) to why it was left alone (a report's ``skipped``).
    Up to ``inline`` entries are listed whole on one line; more are summarised by reason, with
    the pointer to ``report.json`` where the whole list is.

    Example:
        >>> skipped_summary({"fc": "output layer (--prune-output-layer prunes it)"})
        ['left dense: fc (output layer (--prune-output-layer prunes it))']
        >>> lines = skipped_summary({f"l{i}": "ignored" for i in range(9)} | {"fc": "output layer (x)"})
        >>> lines[0]
        'left dense: 10 entries, by reason (the full list is in report.json):'
        >>> lines[1]
        '  9 ignored: l0, l1, l2 and 6 more'
    """
    if not skipped:
        return []
    if len(skipped) <= inline:
        return ["left dense: " + ", ".join(f"{k} ({v})" for k, v in skipped.items())]
    groups: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        groups.setdefault(_reason_kind(reason), []).append(name)
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))  # stable: first seen first among ties
    width = len(str(len(ordered[0][1])))
    lines = [f"left dense: {len(skipped)} entries, by reason (the full list is in report.json):"]
    for kind, members in ordered[:kinds]:
        more = f" and {len(members) - names} more" if len(members) > names else ""
        lines.append(f"  {len(members):>{width}} {kind}: {', '.join(members[:names])}{more}")
    rest = ordered[kinds:]
    if rest:
        lines.append(f"  {sum(len(m) for _, m in rest):>{width}} for {len(rest)} other reasons")
    return lines
