"""Channel pruning to a latency target measured on this machine (ResNet-50, CPU).

For each target (a fraction of the dense model's measured latency at batch
``--batch-size``), ``Channels(target_latency=...)`` searches the removal
ratio by building and timing real candidates. Reported: the target, what the
search measured for the kept model, an independent re-measurement of the
pruned model, MACs kept, and how long the search took. Run from the
repository root:

    python bench/latency_target.py [--fractions 0.75,0.5,0.3] [--batch-size 8]
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
from secateurs.analysis import measure_latency, steady_allocator  # noqa: E402


def _latency(model: torch.nn.Module, x: torch.Tensor) -> float:
    return min(measure_latency(model, x, warmup=3, repeats=15, max_seconds=10) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--fractions", default="0.75,0.5,0.3", help="targets as fractions of dense latency")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    steady_allocator()  # glibc malloc keeps freed memory: no page faults per activation, steady timings
    torch.manual_seed(0)
    dense = secateurs.load_model(args.model).eval()
    probe = torch.randn(1, 3, 224, 224)
    x = torch.randn(args.batch_size, 3, 224, 224)
    dense_ms = _latency(dense, x)
    base_macs = secateurs.analyze(dense, probe, latency=False, size=False).macs
    rows = [{"target_fraction": 1.0, "target_ms": None, "search_ms": dense_ms, "remeasured_ms": dense_ms,
             "macs_ratio": 1.0, "seconds": 0.0}]
    print(f"dense {dense_ms:.1f} ms at batch {args.batch_size}", flush=True)
    for fraction in [float(f) for f in args.fractions.split(",")]:
        model = copy.deepcopy(dense)
        target = fraction * dense_ms
        start = time.perf_counter()
        report = secateurs.prune_(model, secateurs.Channels(target_latency=target, latency_batch_size=args.batch_size),
                                  example_inputs=probe)
        seconds = time.perf_counter() - start
        log = report.outcome["latency_ms"]
        again = _latency(model, x)
        macs = secateurs.analyze(model, probe, latency=False, size=False).macs / base_macs
        rows.append({"target_fraction": fraction, "target_ms": target, "search_ms": log["achieved"],
                     "remeasured_ms": again, "macs_ratio": macs, "seconds": seconds, "trials": log["trials"]})
        print(rows[-1], flush=True)
    table = markdown_table(
        ["target (fraction of dense)", "target (ms)", "measured by the search (ms)", "re-measured (ms)", "met",
         "speedup", "MACs kept", "search (s)"],
        [[f"{r['target_fraction']:.2f}", "" if r["target_ms"] is None else f"{r['target_ms']:.1f}",
          f"{r['search_ms']:.1f}", f"{r['remeasured_ms']:.1f}",
          "" if r["target_ms"] is None else ("yes" if r["remeasured_ms"] <= r["target_ms"] * 1.05 else "no"),
          f"{dense_ms / r['remeasured_ms']:.2f}x", f"{r['macs_ratio']:.3f}", f"{r['seconds']:.0f}"] for r in rows])
    notes = (f"{args.model}, random init, batch {args.batch_size}, CPU, with `steady_allocator()`; dense and "
             "re-measured latency = the best of 3 medians of 15 runs; the search judges each candidate by the best "
             "of 3 medians of up to 10 runs (3 s each). 'met' allows 5% for timing noise between the search's "
             "measurement and the re-measurement.")
    write_results("latency_target", f"Latency targets on CPU ({args.model.split(':')[-1]})", table, rows, notes)


if __name__ == "__main__":
    main()
