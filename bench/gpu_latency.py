"""Deployed GPU latency of channel-pruned models against their dense originals.

Issue 7's goal: ResNet-50 at about 3.9x fewer MACs at least 3x faster at batch 256
once deployed (folded BatchNorm, channels_last, float16), and never slower than
the dense model at batch 1, 64 and 256. For each model, the dense and the pruned
copy go through the same deployment steps, then each batch size is timed in
every mode, the models interleaved in each of several rounds (each keeps its best
round's median), so a drifting clock or a neighbour's load hits both alike:

- ``eager``: the module called from Python;
- ``cudagraph``: the same forward captured once in a CUDA graph and replayed
  (no launch overhead: what a serving stack does for small batches);
- ``compile``: ``torch.compile`` (default mode; opt in, it takes minutes).

Run on a CUDA machine from the repository root (about 3 minutes with the defaults):

    python bench/gpu_latency.py [--models resnet50,mobilenet_v2] [--ratio 0.5] [--batches 1,64,256]

``--smoke`` runs the same code on CPU in float32 at batch 1-2 (what a machine
without a GPU can check) and only prints its table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import deployed, markdown_table, write_results  # noqa: E402


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], list[float]]:
    if device.type == "cuda":
        def cuda_times(fn: Callable[[], Any], n: int) -> list[float]:
            out = []
            for _ in range(n):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            return out
        return cuda_times

    def cpu_times(fn: Callable[[], Any], n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
        return out
    return cpu_times


def runner(model: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], Any]:
    """A no-argument callable running one forward of ``model`` on ``x`` in ``mode`` (warmed up)."""
    if mode == "eager":
        def eager() -> Any:
            with torch.inference_mode():
                return model(x)
        fn = eager
    elif mode == "compile":
        compiled = torch.compile(model)

        def run_compiled() -> Any:
            with torch.inference_mode():
                return compiled(x)
        fn = run_compiled
    elif mode == "cudagraph":
        if x.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # warm up on a side stream before capture, as PyTorch asks
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = model(static_x)

        def replay() -> Any:
            graph.replay()
            return static_out
        fn = replay
    else:
        raise ValueError(f"unknown mode {mode}")
    for _ in range(3):
        fn()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return fn


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--ratio", type=float, default=0.5, help="uniform channel ratio (0.5: ResNet-50 3.9x MACs)")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--modes", default="eager,cudagraph", help="eager, cudagraph, compile")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per round (median)")
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, batches 1,2, eager: checks the script")
    args = parser.parse_args()
    if args.smoke:
        device, dtype, batches, modes = torch.device("cpu"), torch.float32, [1, 2], ["eager"]
        args.rounds, args.repeats = 1, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run on a GPU machine, or pass --smoke to check the script on CPU")
        device, dtype = torch.device("cuda"), torch.float16
        batches, modes = [int(b) for b in args.batches.split(",")], args.modes.split(",")
        torch.backends.cudnn.benchmark = True
    times = _timer(device)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        dense = torchvision.models.get_model(name).eval()
        probe = torch.randn(1, 3, 224, 224)
        pruned = copy.deepcopy(dense)
        secateurs.prune_(pruned, secateurs.Channels(ratio=args.ratio, round_to=8), example_inputs=probe)
        macs = [secateurs.analyze(m, probe, latency=False, size=False).macs for m in (dense, pruned)]
        models = {"dense": deployed(dense, probe, device, dtype), "pruned": deployed(pruned, probe, device, dtype)}
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            for mode in modes:
                fns = {k: runner(m, x, mode) for k, m in models.items()}
                best = {k: float("inf") for k in fns}
                for _ in range(args.rounds):
                    for k, fn in fns.items():
                        best[k] = min(best[k], statistics.median(times(fn, args.repeats)))
                row = {"model": name, "batch": batch, "mode": mode, "dense_ms": best["dense"],
                       "pruned_ms": best["pruned"], "speedup": best["dense"] / best["pruned"],
                       "macs_dense": macs[0], "macs_pruned": macs[1], "macs_reduction": macs[0] / macs[1]}
                rows.append(row)
                print(row, flush=True)
                del fns
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    table = markdown_table(
        ["model", "MACs reduction", "batch", "mode", "dense (ms)", "pruned (ms)", "speedup"],
        [[r["model"], f"{r['macs_reduction']:.2f}x", r["batch"], r["mode"], f"{r['dense_ms']:.3f}",
          f"{r['pruned_ms']:.3f}", f"{r['speedup']:.2f}x"] for r in rows])
    notes = (f"Device: {where}; {dtype} weights and inputs, channels_last, BatchNorm folded into the convs, "
             f"cudnn.benchmark on GPU. Pruning: uniform ratio {args.ratio}, L2 magnitude, widths rounded to 8. "
             f"Each cell: best of {args.rounds} interleaved rounds of the median of {args.repeats} timed runs.")
    if args.smoke:
        print(table)  # a check of the script, not a result to commit
        return
    write_results("gpu_latency", "Deployed GPU latency, dense vs pruned", table, rows, notes)


if __name__ == "__main__":
    main()
