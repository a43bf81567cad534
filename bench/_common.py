"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import copy
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from secateurs.analysis import steady_allocator

RESULTS = Path(__file__).resolve().parent / "results"

# Every benchmark times models: glibc's allocator must not make some timings page-fault bound.
steady_allocator()


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
    }


def write_results(name: str, title: str, table_md: str, rows: list[dict[str, Any]], notes: str = "") -> None:
    """Write ``results/NAME.md`` (human table + the command) and ``results/NAME.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    env = environment()
    md = [f"# {title}", "", f"Command: `{command}`", "",
          "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "", table_md, ""]
    if notes:
        md += [notes, ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    (RESULTS / f"{name}.json").write_text(json.dumps({"command": command, "environment": env, "rows": rows}, indent=2))


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def deployed(model: torch.nn.Module, probe: torch.Tensor, device: torch.device | None = None,
             dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy in the inference form ``secateurs export --fold-bn`` gives: BatchNorm folded into
    its conv, channels_last, optionally moved to ``device``/``dtype``. ``probe``: one input on CPU."""
    from secateurs.surgery.fold import fold_batchnorm_

    out = copy.deepcopy(model).eval()
    fold_batchnorm_(out, probe.expand(2, *probe.shape[1:]))
    return out.to(device=device, dtype=dtype, memory_format=torch.channels_last)
