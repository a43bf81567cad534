"""Does channel pruning turn MACs savings into CPU latency savings?

For each model and ratio: MACs and median CPU latency at batch 8 before and
after pruning (random init, default settings), and the ratio of the measured
speedup to the MACs reduction (goal: at least 0.85), both as pruned (eager) and
deployed (BatchNorm folded, channels_last). If ``torch-pruning`` is
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
from _common import deployed, markdown_table, write_results  # noqa: E402
from secateurs.analysis import measure_latency, steady_allocator  # noqa: E402


def torch_pruning_step(model: torch.nn.Module, probe: torch.Tensor, ratio: float) -> None:
    """Torch-Pruning's documented default: group L2 magnitude, uniform ratio, classifier ignored."""
    import torch_pruning as tp

    from secateurs.selection import find_output_layer

    head = dict(model.named_modules())[find_output_layer(model, probe)]
    pruner = tp.pruner.MetaPruner(model, probe, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[head])
    pruner.step()


def _prune(tool: str, base: torch.nn.Module, prune, name: str, ratio: float, probe: torch.Tensor,
           tries: int) -> tuple[dict, torch.nn.Module | None]:
    """Prune fresh copies ``tries`` times; the time is the best try (both tools alike)."""
    times = []
    try:
        for _ in range(tries):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            prune(model, probe, ratio)
            times.append(time.perf_counter() - start)
        with torch.no_grad():
            out = model(probe)
        if out.shape != (1, 1000):
            raise RuntimeError(f"output shape changed to {tuple(out.shape)}")
    except Exception as exc:  # a tool failing on a model is a result, not a crash
        return {"tool": tool, "model": name, "ratio": ratio, "error": str(exc).splitlines()[0][:120]}, None
    macs = secateurs.analyze(model, probe, latency=False, size=False).macs
    return {"tool": tool, "model": name, "ratio": ratio, "macs_after": macs, "prune_seconds": min(times),
            "prune_seconds_all": times}, model


def _latencies(runs: list[tuple[torch.nn.Module, torch.Tensor]], rounds: int, repeats: int) -> list[float]:
    """Min over ``rounds`` of each (model, input)'s median latency, all interleaved in every round.

    On a shared machine the background load drifts over minutes; measuring the dense and
    pruned models side by side in each round, and keeping each one's best round, compares
    them under the same conditions instead of against one early dense number.
    """
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, (model, x) in enumerate(runs):
            best[i] = min(best[i], measure_latency(model, x, warmup=2, repeats=repeats, max_seconds=60))
    return best


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds per model")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per round (median)")
    parser.add_argument("--prune-tries", type=int, default=3, help="prune time: best of this many fresh copies")
    parser.add_argument("--no-torch-pruning", action="store_true", help="skip the torch-pruning comparison")
    args = parser.parse_args()
    steady_allocator()  # glibc malloc keeps freed memory: no page faults per activation, steady timings
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
        done, models = [], [base]
        for ratio in (float(r) for r in args.ratios.split(",")):
            for tool, prune in tools:
                row, model = _prune(tool, base, prune, name, ratio, probe, args.prune_tries)
                done.append(row)
                if model is not None:
                    row["_index"] = len(models)
                    models.append(model)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        lats = _latencies([(m, x) for m in models] + [(deployed(m, probe), x_cl) for m in models],
                          args.rounds, args.repeats)
        n = len(models)
        for row in done:
            if "error" not in row:
                i = row.pop("_index")
                row.update({"macs_before": macs0, "latency_before_ms": lats[0], "latency_after_ms": lats[i],
                            "macs_reduction": macs0 / row["macs_after"], "speedup": lats[0] / lats[i],
                            "deployed_latency_before_ms": lats[n], "deployed_latency_after_ms": lats[n + i],
                            "deployed_speedup": lats[n] / lats[n + i]})
                row["efficiency"] = row["speedup"] / row["macs_reduction"]
                row["deployed_efficiency"] = row["deployed_speedup"] / row["macs_reduction"]
            rows.append(row)
            print(row, flush=True)
    table = markdown_table(
        ["tool", "model", "ratio", "MACs (1 image)", "MACs reduction", f"eager bs{args.batch} (ms)", "speedup",
         "speedup / MACs reduction", f"deployed bs{args.batch} (ms)", "deployed speedup", "deployed / MACs reduction",
         "prune (s)"],
        [[r["tool"], r["model"], r["ratio"], f"failed: {r['error']}"] + [""] * 8 if "error" in r else
         [r["tool"], r["model"], r["ratio"], f"{r['macs_before'] / 1e9:.2f}G -> {r['macs_after'] / 1e9:.2f}G",
          f"{r['macs_reduction']:.2f}x", f"{r['latency_before_ms']:.0f} -> {r['latency_after_ms']:.0f}",
          f"{r['speedup']:.2f}x", f"{r['efficiency']:.2f}",
          f"{r['deployed_latency_before_ms']:.0f} -> {r['deployed_latency_after_ms']:.0f}",
          f"{r['deployed_speedup']:.2f}x", f"{r['deployed_efficiency']:.2f}", f"{r['prune_seconds']:.2f}"]
         for r in rows],
    )
    notes = ("The process first calls `secateurs.analysis.steady_allocator()`: with glibc's default thresholds "
             "each large activation is mapped and unmapped on every forward, which made the dense MobileNetV2 vary "
             "between 93 and 330 ms at batch 8 depending on earlier allocations. "
             f"Latency: for each model, the dense model and every pruned one are timed in turn, {args.rounds} "
             f"rounds; each keeps its best round's median of {args.repeats} runs (after 2 warm-ups). torch's "
             "default 2 CPU threads, fp32. Eager: the modules as pruned. Deployed: the form `secateurs export --fold-bn` "
             "gives, BatchNorm folded into the convs, weights and inputs channels_last (dense and pruned alike). "
             "An efficiency of 1.0 means the speedup equals the MACs reduction. "
             f"Prune time: best of {args.prune_tries} prunes of fresh copies, same for both tools. Both tools: "
             "random init, uniform ratio, L2 magnitude (secateurs' default), classifier kept.")
    if len(tools) > 1:
        import torch_pruning

        notes += f" torch-pruning {torch_pruning.__version__} (MetaPruner, GroupMagnitudeImportance(p=2), defaults)."
    write_results("speed", "CPU speedup vs MACs reduction after channel pruning", table, rows, notes)


if __name__ == "__main__":
    main()
