"""One self-contained HTML page per pruned model: numbers, charts and the exact recipe.

Everything is inline (CSS in a ``<style>`` element, charts as PNG data URIs),
so the file opens anywhere with no network and no script. Built from the
``report.json`` that ``secateurs prune`` / ``secateurs finetune`` write next
to the model.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ..errors import SecateursError
from ..utils import first_line
from .plots import bars_png, history_png, scatter_png, sensitivity_png, widths_png
from .table import human_bytes, human_count

__all__ = ["REPORT_NAME", "render_comparison", "render_report", "write_report"]

REPORT_NAME = "report.html"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.muted { color: #666; font-size: 0.9em; }
"""


class _Malformed(Exception):
    """A field of report.json with the wrong type (``str(exc)`` says which)."""


_NUMBER = "a number"


def _check(value: Any, expected: str, where: str, *, optional: bool = False) -> Any:
    """``value`` if it has the JSON type ``expected`` names; else raise :class:`_Malformed`."""
    if value is None and optional:
        return value
    kinds = {"an object": dict, "a list": list, "a string": str, _NUMBER: (int, float)}
    if not isinstance(value, kinds[expected]) or (expected == _NUMBER and isinstance(value, bool)):
        got = "null" if value is None else type(value).__name__.replace("dict", "object").replace("str", "string")
        raise _Malformed(f'"{where}" should be {expected}, got {got}')
    return value


def _check_stats(stats: Any, where: str) -> None:
    """``before`` / ``after`` of a prune report: analyze's numbers and per-layer rows."""
    _check(stats, "an object", where)
    for key in ("params", "nonzero_params", "macs", "nonzero_macs", "latency_ms", "size_bytes"):
        _check(stats.get(key), _NUMBER, f"{where}.{key}", optional=True)
    for i, layer in enumerate(_check(stats.get("layers", []), "a list", f"{where}.layers")):
        at = f"{where}.layers[{i}]"
        _check(layer, "an object", at)
        _check(layer.get("name"), "a string", f"{at}.name")
        for j, dim in enumerate(_check(layer.get("shape"), "a list", f"{at}.shape", optional=True) or []):
            _check(dim, _NUMBER, f"{at}.shape[{j}]")
        for key in ("params", "nonzero"):
            _check(layer.get(key), _NUMBER, f"{at}.{key}")


def _check_scan(scan: Any, where: str) -> None:
    """A sensitivity scan as :func:`sensitivity_png` reads it."""
    _check(scan, "an object", where)
    metric = _check(scan.get("metric"), "a string", f"{where}.metric")
    _check(scan.get("method"), "a string", f"{where}.method")
    for i, curve in enumerate(_check(scan.get("curves"), "a list", f"{where}.curves")):
        at = f"{where}.curves[{i}]"
        _check(curve, "an object", at)
        _check(curve.get("name"), "a string", f"{at}.name")
        series = [("ratios", curve.get("ratios"))]
        series.append((metric, curve[metric]) if curve.get(metric) else ("loss", curve.get("loss")))
        for key, values in series:
            if not _check(values, "a list", f"{at}.{key}"):
                raise _Malformed(f'"{at}.{key}" is empty')
            for j, v in enumerate(values):
                _check(v, _NUMBER, f"{at}.{key}[{j}]")


def _check_report(result: Any) -> None:
    """Every field :func:`render_report` reads, with the type it needs (report.json may have been edited)."""
    _check(result, "an object", "the whole file")
    if result.get("method", "?") == "finetune":
        for part in ("before", "final"):
            values = _check(result.get(part, {}), "an object", part)
            for key in ("accuracy", "perplexity", "loss"):
                _check(values.get(key), _NUMBER, f"{part}.{key}", optional=key not in values)
        for i, epoch in enumerate(_check(result.get("history") or [], "a list", "history")):
            _check(epoch, "an object", f"history[{i}]")
            for key, value in epoch.items():
                if key == "epoch" or key.endswith(("_loss", "_accuracy")):
                    _check(value, _NUMBER, f"history[{i}].{key}")
    else:
        _check_stats(result.get("before", {}), "before")
        _check_stats(result.get("after", {}), "after")
        for i, step in enumerate(_check(result.get("finetune_steps") or [], "a list", "finetune_steps")):
            _check(_check(step, "an object", f"finetune_steps[{i}]").get("accuracy"), _NUMBER,
                   f"finetune_steps[{i}].accuracy", optional=True)
    pruning = _check(result.get("pruning", {}), "an object", "pruning")
    plan = pruning.get("plan")
    if isinstance(plan, dict):
        for i, name in enumerate(_check(plan.get("drop") or [], "a list", "pruning.plan.drop")):
            _check(name, "a string", f"pruning.plan.drop[{i}]")
    for i, layer in enumerate(_check(pruning.get("layers", []), "a list", "pruning.layers")):
        at = f"pruning.layers[{i}]"
        _check(_check(layer, "an object", at).get("name"), "a string", f"{at}.name")
        for key in ("numel", "zeros", "sparsity"):
            _check(layer.get(key), _NUMBER, f"{at}.{key}")
    importance = _check(pruning.get("importance"), "an object", "pruning.importance", optional=True) or {}
    for name, group in (_check(importance.get("groups"), "an object", "pruning.importance.groups",
                               optional=True) or {}).items():
        at = f"pruning.importance.groups.{name}"
        _check(group, "an object", at)
        for key, length in (("kept", 3), ("removed", 5)):  # quantiles: min, q1, median, q3, max
            values = _check(group.get(key), "a list", f"{at}.{key}")
            if values and (len(values) < length or not all(isinstance(v, (int, float)) for v in values)):
                raise _Malformed(f'"{at}.{key}" should be five numbers (quantiles)')
    _check(pruning.get("skipped"), "an object", "pruning.skipped", optional=True)
    for i, fit in enumerate(_check(pruning.get("reconstruction") or [], "a list", "pruning.reconstruction")):
        at = f"pruning.reconstruction[{i}]"
        _check(_check(fit, "an object", at).get("name"), "a string", f"{at}.name")
        for key in ("error_before", "error_after"):
            _check(fit.get(key), _NUMBER, f"{at}.{key}", optional=fit.get(key) is None)
    if pruning.get("sensitivity"):
        _check_scan(pruning["sensitivity"], "pruning.sensitivity")
    _check(result.get("seconds"), _NUMBER, "seconds", optional=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ratio(a: Any, b: Any) -> str:
    return f"{b / a:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""


def _summary(before: dict[str, Any], after: dict[str, Any], extra: list[list[Any]]) -> tuple[str, bytes | None]:
    rows, labels, ratios = [], [], []
    for key, label, fmt in (("params", "parameters", human_count), ("nonzero_params", "nonzero parameters", human_count),
                            ("macs", "MACs", human_count), ("nonzero_macs", "nonzero MACs", human_count),
                            ("latency_ms", "latency (ms)", lambda v: f"{v:.3f}"),
                            ("size_bytes", "file size", human_bytes)):
        a, b = before.get(key), after.get(key)
        if a is None and b is None:
            continue
        rows.append([label, fmt(a) if a is not None else "", fmt(b) if b is not None else "", _ratio(a, b)])
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
            labels.append(label)
            ratios.append(b / a)
    rows += extra
    chart = bars_png(labels, ratios, title="after / before", xlabel="ratio (1.0 = unchanged)") if labels else None
    return _table(["", "before", "after", "after/before"], rows), chart


def _layers(before: dict[str, Any], after: dict[str, Any], dropped: list[str] | None = None) -> list[str]:
    """Per-layer width and density charts (layers missing after pruning count as removed).

    ``dropped``: blocks removed by layer pruning; the layers after them in their container were renumbered.
    """
    from ..surgery.layers import name_after_drop

    b_layers = {layer["name"]: layer for layer in before.get("layers", [])}
    by_name = {layer["name"]: layer for layer in after.get("layers", [])}
    a_layers = {}
    for n in b_layers:
        now = name_after_drop(n, dropped) if dropped else n
        if now is not None and now in by_name:
            a_layers[n] = by_name[now]
    names = [n for n in b_layers if b_layers[n].get("shape")]
    if not names:
        return []
    out = []
    widths_b = [b_layers[n]["shape"][0] for n in names]
    widths_a = [a_layers[n]["shape"][0] if n in a_layers and a_layers[n].get("shape") else 0 for n in names]
    if widths_a != widths_b:
        out.append(_img(widths_png(names, widths_b, widths_a, ylabel="output channels / features",
                                   title="width of each layer"), "layer widths before and after"))
    dens_b = [b_layers[n]["nonzero"] / max(b_layers[n]["params"], 1) for n in names]
    dens_a = [a_layers[n]["nonzero"] / max(a_layers[n]["params"], 1) if n in a_layers else 0.0 for n in names]
    if max(abs(a - b) for a, b in zip(dens_a, dens_b, strict=True)) > 0.01:  # only when sparsity changed
        out.append(_img(widths_png(names, dens_b, dens_a, ylabel="nonzero fraction", title="density of each layer"),
                        "layer density before and after"))
    rows = [[n, "x".join(map(str, b_layers[n]["shape"])),
             "x".join(map(str, a_layers[n]["shape"])) if n in a_layers else "removed",
             human_count(b_layers[n]["params"]), human_count(a_layers[n]["nonzero"]) if n in a_layers else "0"]
            for n in names]
    out.append(_table(["layer", "shape before", "shape after", "params before", "nonzero after"], rows))
    return out


def _plan(pruning: dict[str, Any]) -> list[str]:
    out = []
    layers = pruning.get("layers", [])
    if layers:
        rows = [[layer["name"], layer["numel"], layer["zeros"], f"{1 - layer['sparsity']:.1%}"] for layer in layers]
        unit = "channels" if pruning.get("method") == "channel" else "weights"
        out.append(_table(["pruned unit", unit, "removed", "kept"], rows))
        out.append(_img(bars_png([layer["name"][:48] for layer in layers], [1 - layer["sparsity"] for layer in layers],
                                 title="fraction kept per pruned unit", xlabel="kept"), "fraction kept per unit"))
    importance = pruning.get("importance")
    if importance and importance.get("groups"):
        groups = importance["groups"]
        names = list(groups)
        kept_median = [groups[n]["kept"][2] if groups[n]["kept"] else 0.0 for n in names]
        removed_max = [groups[n]["removed"][4] if groups[n]["removed"] else 0.0 for n in names]
        out.append(f"<p>Importance ({html.escape(str(importance.get('criterion')))}), relative to each group's mean: "
                   "the highest score removed against the median score kept.</p>")
        out.append(_img(widths_png([n[:40] for n in names], kept_median, removed_max, ylabel="score / group mean",
                                   title="importance per group", labels=("median kept", "highest removed")),
                        "importance distribution"))
    if pruning.get("skipped"):
        out.append("<p>Left unpruned:</p>" + _table(["tensor or group", "why"],
                                                    [[k, v] for k, v in pruning["skipped"].items()]))
    return out


def _reconstruction(fits: list[dict[str, Any]]) -> list[str]:
    """Each refitted layer's output error on the calibration data, before and after its refit."""
    def error(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    rows = [[f["name"], f.get("how", ""), error(f.get("error_before")), error(f.get("error_after")),
             f.get("damp") if f.get("damp") is not None else "-", f.get("note", "")] for f in fits]
    done = [f for f in fits if isinstance(f.get("error_after"), (int, float)) and f.get("how") != "none"]
    out = ["<p>Layers that read removed channels, refitted in forward order to reproduce the dense model on the "
           "calibration data. Error: squared distance of the layer's output to the dense layer's, relative to the "
           "dense output's energy.</p>"]
    if done:
        out.append(_img(bars_png([f["name"] for f in done], [f["error_after"] for f in done],
                                 title="relative output error after reconstruction", xlabel="error"),
                        "reconstruction error per layer"))
    out.append(_table(["layer", "how", "error before", "error after", "damping", "note"], rows))
    return out


def _page(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def render_comparison(title: str, results: dict[str, dict[str, Any]], *, intro: str = "") -> str:
    """A page comparing variants of a model (the demo's): a table and accuracy against MACs."""
    keys = [("accuracy", lambda v: f"{v:.1%}"), ("params", human_count), ("nonzero_params", human_count),
            ("macs", human_count), ("nonzero_macs", human_count), ("latency_ms", lambda v: f"{v:.3f}"),
            ("size_bytes", human_bytes)]
    rows = [[name] + [fmt(r[k]) if r.get(k) is not None else "" for k, fmt in keys] for name, r in results.items()]
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>" if intro else "",
             _table(["variant", *[k for k, _ in keys]], rows)]
    points = {name: (r["nonzero_macs"], r["accuracy"]) for name, r in results.items()
              if r.get("nonzero_macs") is not None and r.get("accuracy") is not None}
    if points:
        parts.append(_img(scatter_png(points, xlabel="nonzero MACs", ylabel="test accuracy",
                                      title="accuracy against compute"), "accuracy against MACs"))
    return _page(title, parts)


def render_report(result: dict[str, Any], *, sensitivity: dict[str, Any] | None = None) -> str:
    """The HTML page for one ``report.json`` (and an optional sensitivity scan)."""
    method = result.get("method", "?")
    title = f"secateurs: {result.get('model', 'model')} ({method})"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if result.get("out"):
        parts.append(f"<p class='muted'>saved to {html.escape(str(result['out']))}"
                     + (f", in {result['seconds']:.1f} s" if isinstance(result.get("seconds"), (int, float)) else "")
                     + "</p>")
    if method == "finetune":
        before, final = result.get("before", {}), result.get("final", {})
        rows = [[k, f"{before.get(k, float('nan')):.4f}", f"{final.get(k, float('nan')):.4f}", ""]
                for k in ("accuracy", "perplexity", "loss") if k in final]  # perplexity: text
        parts += ["<h2>Summary</h2>", _table(["", "before", "after", ""], rows)]
        if result.get("history"):
            parts += ["<h2>Training</h2>", _img(history_png(result["history"]), "training curves")]
    else:
        extra = []
        steps = result.get("finetune_steps")
        if steps:
            extra.append(["accuracy after fine-tuning", "", f"{steps[-1].get('accuracy', float('nan')):.4f}", ""])
        table, chart = _summary(result.get("before", {}), result.get("after", {}), extra)
        parts += ["<h2>Summary</h2>", table]
        if chart:
            parts.append(_img(chart, "after/before ratios"))
        plan = result.get("pruning", {}).get("plan") or {}
        layer_parts = _layers(result.get("before", {}), result.get("after", {}),
                              plan.get("drop") if isinstance(plan, dict) else None)
        if layer_parts:
            parts += ["<h2>Layers</h2>", *layer_parts]
        plan_parts = _plan(result.get("pruning", {}))
        if plan_parts:
            parts += ["<h2>Pruning plan</h2>", *plan_parts]
        fits = result.get("pruning", {}).get("reconstruction")
        if fits:
            parts += ["<h2>Reconstruction</h2>", *_reconstruction(fits)]
    sensitivity = sensitivity or result.get("pruning", {}).get("sensitivity")  # allocate="sensitivity" keeps them
    if sensitivity:
        parts += ["<h2>Sensitivity</h2>", _img(sensitivity_png(sensitivity), "sensitivity curves")]
    recipe = {k: result[k] for k in ("command", "method", "config") if k in result}
    parts += ["<h2>How it was made</h2>", f"<pre>{html.escape(json.dumps(recipe, indent=2, default=str))}</pre>"]
    return _page(title, parts)


def write_report(model_dir: str | Path, out: str | Path | None = None, *,
                 sensitivity: str | Path | None = None, overwrite: bool = True) -> Path:
    """Render ``model_dir/report.json`` to ``out`` (default ``model_dir/report.html``), atomically."""
    from ..io.atomic import write_files_atomically

    model_dir = Path(model_dir)
    source = model_dir / "report.json"
    if not source.is_file():
        raise SecateursError(f"'{model_dir}' has no report.json: pass a folder written by secateurs prune or finetune")
    try:
        result = json.loads(source.read_text())
        scan = json.loads(Path(sensitivity).read_text()) if sensitivity else None
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise SecateursError(f"cannot read the report data ({first_line(exc)}): re-run the command that wrote it"
                             ) from None
    try:
        _check_report(result)
    except _Malformed as exc:
        raise SecateursError(f"'{source}' is not a secateurs report ({exc}): re-run the command that wrote "
                             "the folder") from None
    try:
        if scan is not None:
            _check_scan(scan, "the scan")
    except _Malformed as exc:
        raise SecateursError(f"'{sensitivity}' is not a sensitivity scan ({exc}): pass the .json written by "
                             "secateurs sensitivity") from None
    target = Path(out) if out else model_dir / REPORT_NAME
    if (target.exists() and target.resolve().parent == model_dir.resolve() and target.name != REPORT_NAME):
        raise SecateursError(f"'{target}' is one of the model's own files: write the report elsewhere")
    if target.exists() and not overwrite:
        raise SecateursError(f"'{target}' exists: choose another --out or pass --overwrite")
    try:
        page = render_report(result, sensitivity=scan)
    except SecateursError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as exc:
        # values of the right types that still cannot be drawn (the checks above cover what we write)
        raise SecateursError(f"cannot render '{source}' ({type(exc).__name__}: {first_line(exc)}): re-run the "
                             "command that wrote the folder") from None
    write_files_atomically({target: page.encode()})
    return target
