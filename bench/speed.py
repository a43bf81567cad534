"""Does channel pruning turn MACs savings into CPU latency savings?

For each model and ratio: MACs and median CPU latency at batch 8 before and
after pruning (random init, default settings), and the ratio of the measured
speedup to the MACs reduction (goal: at least 0.85). Run from the repository root:

    python bench/speed.py [--models resnet50,mobilenet_v2,vit_b_16] [--ratios 0.25,0.5,0.75] [--batch 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from secateurs.analysis import measure_latency  # noqa: E402


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet50,mobilenet_v2,vit_b_16")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        base = torchvision.models.get_model(name).eval()
        x = torch.randn(args.batch, 3, 224, 224)
        probe = x[:1]
        macs0 = secateurs.analyze(base, probe, latency=False, size=False).macs
        lat0 = measure_latency(base, x, warmup=2, repeats=10, max_seconds=30)
        for ratio in (float(r) for r in args.ratios.split(",")):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            secateurs.prune_(model, secateurs.Channels(ratio=ratio), example_inputs=probe)
            seconds = time.perf_counter() - start
            macs = secateurs.analyze(model, probe, latency=False, size=False).macs
            lat = measure_latency(model, x, warmup=2, repeats=10, max_seconds=30)
            macs_reduction, speedup = macs0 / macs, lat0 / lat
            rows.append({
                "model": name, "ratio": ratio, "macs_before": macs0, "macs_after": macs,
                "latency_before_ms": lat0, "latency_after_ms": lat, "macs_reduction": macs_reduction,
                "speedup": speedup, "efficiency": speedup / macs_reduction, "prune_seconds": seconds,
            })
            print(rows[-1], flush=True)
    table = markdown_table(
        ["model", "ratio", "MACs (1 image)", "MACs reduction", f"latency bs{args.batch} (ms)", "speedup",
         "speedup / MACs reduction", "prune (s)"],
        [[r["model"], r["ratio"], f"{r['macs_before'] / 1e9:.2f}G -> {r['macs_after'] / 1e9:.2f}G",
          f"{r['macs_reduction']:.2f}x", f"{r['latency_before_ms']:.0f} -> {r['latency_after_ms']:.0f}",
          f"{r['speedup']:.2f}x", f"{r['efficiency']:.2f}", f"{r['prune_seconds']:.1f}"] for r in rows],
    )
    notes = ("Latency: median of up to 10 timed runs after 2 warm-ups, torch's default 2 CPU threads, fp32, eager. "
             "An efficiency of 1.0 means the speedup equals the MACs reduction.")
    write_results("speed", "CPU speedup vs MACs reduction after channel pruning", table, rows, notes)


if __name__ == "__main__":
    main()
