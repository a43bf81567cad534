"""Accuracy of unstructured and N:M pruning on the demo CNN (scikit-learn digits).

For each setting: accuracy one-shot and after a short recovery fine-tune (masks
kept), nonzero parameters and saved size. Run from the repository root:

    python bench/unstructured_digits.py [--recover-epochs 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from secateurs.data import load_dataset  # noqa: E402
from secateurs.demo import DemoConfig, _dense_model  # noqa: E402
from secateurs.train import evaluate, fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recover-epochs", type=int, default=5)
    args = parser.parse_args()
    split = load_dataset("digits")
    dense = _dense_model(DemoConfig(), split, "cnn")
    x = torch.zeros(split.input_shape)
    dense_acc = evaluate(dense, split.x_test, split.y_test)["accuracy"]
    with tempfile.TemporaryDirectory() as d:
        dense_size = secateurs.save(dense, Path(d) / "dense")
    configs = []
    for sparsity in (0.5, 0.7, 0.8, 0.9, 0.95):
        for scope in ("layer", "global"):
            configs.append((f"magnitude {scope} {sparsity:.0%}", secateurs.Unstructured(sparsity=sparsity, scope=scope)))
        configs.append((f"magnitude sensitivity {sparsity:.0%}",
                        secateurs.Unstructured(sparsity=sparsity, allocate="sensitivity", calib_batches=4)))
        configs.append((f"random layer {sparsity:.0%}", secateurs.Unstructured(sparsity=sparsity, importance="random")))
    for n, m in ((2, 4), (4, 8), (1, 4)):
        configs.append((f"{n}:{m} magnitude", secateurs.NM(n=n, m=m)))
    # sensitivity allocation scores each layer on 4 batches of training digits (never the test set)
    calib = [(split.x_train[i : i + 64], split.y_train[i : i + 64]) for i in range(0, 256, 64)]
    rows = []
    for label, config in configs:
        model = copy.deepcopy(dense)
        report = secateurs.prune_(model, config, example_inputs=x, data=calib)
        one_shot = evaluate(model, split.x_test, split.y_test)["accuracy"]
        fit(model, split.x_train, split.y_train, epochs=args.recover_epochs, lr=1e-3)
        recovered = evaluate(model, split.x_test, split.y_test)["accuracy"]
        stats = secateurs.analyze(model, x, latency=False)
        rows.append({
            "setting": label, "pruned_layer_sparsity": report.sparsity, "accuracy_one_shot": one_shot,
            "accuracy_recovered": recovered, "nonzero_params": stats.nonzero_params,
            "size_bytes": stats.size_bytes, "prune_seconds": report.seconds,
        })
        print(f"{label:28s} one-shot {one_shot:.3f}  recovered {recovered:.3f}", flush=True)
    table = markdown_table(
        ["setting", "sparsity (pruned layers)", "acc one-shot", f"acc after {args.recover_epochs} ep", "nonzero params", "size (KiB)"],
        [[r["setting"], f"{r['pruned_layer_sparsity']:.3f}", f"{r['accuracy_one_shot']:.3f}",
          f"{r['accuracy_recovered']:.3f}", r["nonzero_params"], f"{r['size_bytes'] / 1024:.1f}"] for r in rows],
    )
    notes = (f"Dense: accuracy {dense_acc:.3f}, {sum(p.numel() for p in dense.parameters())} params, "
             f"{dense_size / 1024:.1f} KiB. Test set: 360 held-out digits. The output layer is left dense. "
             "Sensitivity allocation scans each layer alone on 256 training digits.")
    write_results("unstructured_digits", "Unstructured and N:M pruning of the demo CNN on digits", table, rows, notes)


if __name__ == "__main__":
    main()
