"""Does channel pruning turn MACs savings into CPU latency savings?

For each model and ratio: MACs and median CPU latency at batch 8 before and
after pruning (random init, default settings), and the ratio of the measured
speedup to the MACs reduction (goal: at least 0.85). If ``torch-pruning`` is
installed (``pip install torch-pruning``; not a dependency of secateurs), it runs
side by side on the same models and ratios with its default magnitude pruner.
Run from the repository root:

    python bench/speed.py [--models resnet50,mobilenet_v2,vit_b_16] [--ratios 0.25,0.5,0.75] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from secateurs.analysis import measure_latency  # noqa: E402


def torch_pruning_step(model: torch.nn.Module, probe: torch.Tensor, ratio: float) -> None:
    """Torch-Pruning's documented default: group L2 magnitude, uniform ratio, classifier ignored."""
    import torch_pruning as tp

    from secateurs.selection import find_output_layer

    head = dict(model.named_modules())[find_output_layer(model, probe)]
    pruner = tp.pruner.MetaPruner(model, probe, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[head])
    pruner.step()


def _measure(tool: str, base: torch.nn.Module, prune, name: str, ratio: float, x: torch.Tensor,
             macs0: int, lat0: float) -> dict:
    model = copy.deepcopy(base)
    probe = x[:1]
    start = time.perf_counter()
    try:
        prune(model, probe, ratio)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = model(probe)
        if out.shape != (1, 1000):
            raise RuntimeError(f"output shape changed to {tuple(out.shape)}")
    except Exception as exc:  # a tool failing on a model is a result, not a crash
        return {"tool": tool, "model": name, "ratio": ratio, "error": str(exc).splitlines()[0][:120]}
    macs = secateurs.analyze(model, probe, latency=False, size=False).macs
    lat = measure_latency(model, x, warmup=2, repeats=10, max_seconds=30)
    return {
        "tool": tool, "model": name, "ratio": ratio, "macs_before": macs0, "macs_after": macs,
        "latency_before_ms": lat0, "latency_after_ms": lat, "macs_reduction": macs0 / macs,
        "speedup": lat0 / lat, "efficiency": (lat0 / lat) / (macs0 / macs), "prune_seconds": seconds,
    }


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-torch-pruning", action="store_true", help="skip the torch-pruning comparison")
    args = parser.parse_args()
    tools = [("secateurs", lambda m, probe, r: secateurs.prune_(m, secateurs.Channels(ratio=r), example_inputs=probe))]
    if importlib.util.find_spec("torch_pruning") is not None and not args.no_torch_pruning:
        tools.append(("torch-pruning", torch_pruning_step))
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = torchvision.models.get_model(name).eval()
        x = torch.randn(args.batch, 3, 224, 224)
        probe = x[:1]
        macs0 = secateurs.analyze(base, probe, latency=False, size=False).macs
        lat0 = measure_latency(base, x, warmup=2, repeats=10, max_seconds=30)
        for ratio in (float(r) for r in args.ratios.split(",")):
            for tool, prune in tools:
                rows.append(_measure(tool, base, prune, name, ratio, x, macs0, lat0))
                print(rows[-1], flush=True)
    table = markdown_table(
        ["tool", "model", "ratio", "MACs (1 image)", "MACs reduction", f"latency bs{args.batch} (ms)", "speedup",
         "speedup / MACs reduction", "prune (s)"],
        [[r["tool"], r["model"], r["ratio"], f"failed: {r['error']}", "", "", "", "", ""] if "error" in r else
         [r["tool"], r["model"], r["ratio"], f"{r['macs_before'] / 1e9:.2f}G -> {r['macs_after'] / 1e9:.2f}G",
          f"{r['macs_reduction']:.2f}x", f"{r['latency_before_ms']:.0f} -> {r['latency_after_ms']:.0f}",
          f"{r['speedup']:.2f}x", f"{r['efficiency']:.2f}", f"{r['prune_seconds']:.1f}"] for r in rows],
    )
    notes = ("Latency: median of up to 10 timed runs after 2 warm-ups, torch's default 2 CPU threads, fp32, eager. "
             "An efficiency of 1.0 means the speedup equals the MACs reduction. Both tools: random init, uniform "
             "ratio, L2 magnitude (secateurs' default), classifier kept.")
    if len(tools) > 1:
        import torch_pruning

        notes += f" torch-pruning {torch_pruning.__version__} (MetaPruner, GroupMagnitudeImportance(p=2), defaults)."
    write_results("speed", "CPU speedup vs MACs reduction after channel pruning", table, rows, notes)


if __name__ == "__main__":
    main()
