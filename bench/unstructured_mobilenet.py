"""Real ImageNet MobileNetV2, unstructured sparsity with no fine-tuning: which allocation survives?

Same weights and photo crops as ``bench/mobilenet_real.py``. For each
sparsity of the prunable conv weights (the classifier is left dense), three
allocations of the same number of zeros: one sparsity for every layer,
global magnitude ranking, and sensitivity allocation (each layer scanned alone
on calibration crops, then the cheapest zeros first). Metric: top-1 agreement
with the dense model on held-out crops. Run from the repository root:

    python bench/unstructured_mobilenet.py [--crops 8] [--sparsities 0.5,0.7]
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
from mobilenet_real import PHOTOS, calibration_split, real_mobilenet_v2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crops", type=int, default=8, help="random crops per photo")
    parser.add_argument("--sparsities", default="0.5,0.7")
    args = parser.parse_args()
    dense = real_mobilenet_v2()
    data, test, ref = calibration_split(dense, args.crops)
    rows = []
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        settings = {
            "same sparsity per layer": dict(),
            "global magnitude ranking": dict(scope="global"),
            "sensitivity allocation": dict(allocate="sensitivity", calib_batches=len(data)),
        }
        for label, kw in settings.items():
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = secateurs.prune_(model, secateurs.Unstructured(sparsity=sparsity, **kw), data=data)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                agree = (model(test).argmax(1) == ref).float().mean().item()
            layer_sparsities = [layer.sparsity for layer in report.layers]
            rows.append({"sparsity": sparsity, "allocation": label, "agreement": agree,
                         "achieved": report.sparsity, "min_layer": min(layer_sparsities),
                         "max_layer": max(layer_sparsities), "seconds": seconds})
            print(rows[-1], flush=True)
    table = markdown_table(
        ["sparsity", "allocation", "top-1 agreement with dense", "achieved", "layer sparsity min-max", "prune s"],
        [[f"{r['sparsity']:.0%}", r["allocation"], f"{r['agreement']:.3f}", f"{r['achieved']:.3f}",
          f"{r['min_layer']:.2f}-{r['max_layer']:.2f}", f"{r['seconds']:.1f}"] for r in rows])
    notes = (f"{len(test)} held-out crops of {len(PHOTOS)} scikit-image photos; {sum(len(b[0]) for b in data)} other crops "
             f"({len(data)} batches) are the sensitivity scan's data, scored against the dense model's own top-1. "
             "Sparsity counts the 52 prunable convolution weights; the classifier stays dense. No fine-tuning.")
    write_results("unstructured_mobilenet", "MobileNetV2 (real ImageNet weights), unstructured sparsity, "
                  "no fine-tuning", table, rows, notes)


if __name__ == "__main__":
    main()
