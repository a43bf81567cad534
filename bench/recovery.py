"""Prune-and-recover on real MNIST digits: L1 channels vs network slimming vs slimming + distillation.

A ResNet-20-style CNN (``secateurs.zoo:SmallResNet``: three stages of three
basic blocks, widths 16/32/64) is trained from scratch on MNIST-5k (4,000
shuffled training images; the other 1,000 are the test set) for
``--epochs`` epochs, twice: plainly, and with network slimming (L1 on BN
scales). Then, for each MACs target:

* ``l1``: the plain model, L1 channel importance (same ratio per group), fine-tune;
* ``l1-global``: the same, ranked globally (layers lose different shares);
* ``l1-sensitivity``: the same importance, each group's share chosen from its
  measured sensitivity curve (least loss increase per MAC saved);
* ``slim``: the slimming-trained model, BN-scale importance ranked globally, fine-tune;
* ``slim+kd``: the same, fine-tuned with distillation from the plain dense model;
* ``torch-pruning``: Torch-Pruning's documented default (group L2 magnitude,
  uniform ratio) when it is installed, fine-tuned by the same trainer.

Every variant gets the same recovery budget (``--ft-epochs``). Reported: test
accuracy right after pruning (as is, and with BatchNorm statistics
re-estimated on 8 training batches, no gradient step), after recovery, the
MACs kept, and CPU latency at batch 64.

    python bench/recovery.py [--targets 0.25,0.078] [--epochs 8] [--ft-epochs 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402
from secateurs.analysis import measure_latency  # noqa: E402
from secateurs.data import load_dataset  # noqa: E402
from secateurs.train import FinetuneConfig, evaluate_dataset, finetune, recalibrate_bn_  # noqa: E402
from secateurs.zoo import SmallResNet  # noqa: E402


def _macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    return secateurs.analyze(model, x, latency=False, size=False).macs


def torch_pruning_to_macs(model: torch.nn.Module, probe: torch.Tensor, target: float) -> None:
    """Torch-Pruning (group L2 magnitude, uniform ratio) in 1% steps until the MACs target is met."""
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(model, probe)
    pruner = tp.pruner.MetaPruner(model, probe, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.95, iterative_steps=95, ignored_layers=[model.head])
    for _ in range(95):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, probe)
        if macs <= target * base:
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.25,0.078", help="fractions of MACs to keep")
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--ft-epochs", type=int, default=4, help="recovery epochs for every variant")
    parser.add_argument("--slim-strength", type=float, default=1e-2, help="L1 strength on BN scales")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate of dense training")
    parser.add_argument("--ft-lr", type=float, default=0.02, help="peak learning rate of fine-tuning")
    parser.add_argument("--ft-seeds", type=int, default=3, help="fine-tuning runs (seeds) per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", metavar="DIR", help="keep the two trained dense models here and reuse them")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]

    split = load_dataset("mnist5k", seed=args.seed)
    train, test = TensorDataset(split.x_train, split.y_train), TensorDataset(split.x_test, split.y_test)
    calib = [(split.x_train[i : i + 64], split.y_train[i : i + 64]) for i in range(0, 8 * 64, 64)]
    x1 = torch.zeros(1, 1, 28, 28)
    xb = split.x_test[:64]
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, progress=False)
    ft_cfg = FinetuneConfig(epochs=args.ft_epochs, lr=args.ft_lr, seed=args.seed, progress=False)

    torch.manual_seed(args.seed)
    init = SmallResNet()
    cache = Path(args.cache) / f"e{args.epochs}-lr{args.lr}-s{args.seed}-slim{args.slim_strength}" if args.cache else None
    t0 = time.perf_counter()
    if cache is not None and (cache / "dense").is_dir():
        dense, slim = secateurs.load(cache / "dense"), secateurs.load(cache / "slim")
        t0 = None  # trained by an earlier run: no training time to report
    else:
        dense = copy.deepcopy(init)
        finetune(dense, train, config=cfg)
        slim = copy.deepcopy(init)
        finetune(slim, train, config=FinetuneConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, progress=False,
                                                    regularize="bn-l1", reg_strength=args.slim_strength))
        if cache is not None:
            secateurs.save(dense, cache / "dense", input_shape=[1, 1, 28, 28], overwrite=True)
            secateurs.save(slim, cache / "slim", input_shape=[1, 1, 28, 28], overwrite=True)
    dense_seconds = (time.perf_counter() - t0) / 2 if t0 is not None else None
    macs0 = _macs(dense, x1)
    lat0 = measure_latency(dense, xb, repeats=30)
    dense_acc = evaluate_dataset(dense, test)["accuracy"]
    slim_acc = evaluate_dataset(slim, test)["accuracy"]
    gammas = torch.cat([m.weight.detach().abs() for m in slim.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    rows = [{"target": 1.0, "variant": "dense", "macs": macs0, "after_prune": dense_acc, "after_bn_recal": dense_acc,
             "after_ft": dense_acc, "latency_ms": lat0, "prune_s": 0.0, "ft_s": dense_seconds},
            {"target": 1.0, "variant": "dense, slimming-trained", "macs": macs0, "after_prune": slim_acc,
             "after_bn_recal": slim_acc, "after_ft": slim_acc, "latency_ms": lat0, "prune_s": 0.0,
             "ft_s": dense_seconds, "gammas_below_1e-2": int((gammas < 1e-2).sum()), "gammas": gammas.numel()}]
    print(f"dense {dense_acc:.4f}  slimming-trained {slim_acc:.4f}  "
          f"({int((gammas < 1e-2).sum())}/{gammas.numel()} gammas < 1e-2)", flush=True)

    variants = [
        ("l1", dense, lambda m, t: secateurs.prune_(m, secateurs.Channels(target_macs=t, importance="l1"),
                                                    example_inputs=x1), None),
        ("l1-global", dense, lambda m, t: secateurs.prune_(
            m, secateurs.Channels(target_macs=t, importance="l1", scope="global", max_ratio=0.95),
            example_inputs=x1), None),
        ("l1-sensitivity", dense, lambda m, t: secateurs.prune_(
            m, secateurs.Channels(target_macs=t, importance="l1", allocate="sensitivity", max_ratio=0.95,
                                  calib_batches=4), example_inputs=x1, data=calib), None),
        ("slim", slim, lambda m, t: secateurs.prune_(
            m, secateurs.Channels(target_macs=t, importance="bn", scope="global", max_ratio=0.95),
            example_inputs=x1), None),
        ("slim+kd", slim, lambda m, t: secateurs.prune_(
            m, secateurs.Channels(target_macs=t, importance="bn", scope="global", max_ratio=0.95),
            example_inputs=x1), dense),
    ]
    if importlib.util.find_spec("torch_pruning") is not None:
        variants.append(("torch-pruning", dense, lambda m, t: torch_pruning_to_macs(m, x1, t), None))
    for target in targets:
        for name, base, prune, teacher in variants:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            prune(model, target)
            prune_s = time.perf_counter() - t0
            after = evaluate_dataset(model, test)["accuracy"]
            recal = copy.deepcopy(model)
            recalibrate_bn_(recal, calib, batches=len(calib))
            after_recal = evaluate_dataset(recal, test)["accuracy"]
            accs, ft_times = [], []
            for seed in range(args.ft_seeds):  # fine-tuning on 4,000 images is noisy: several seeds
                tuned = copy.deepcopy(recal)
                t0 = time.perf_counter()
                kd = {"kd_weight": 0.5} if teacher is not None else {}
                finetune(tuned, train, teacher=teacher,
                         config=dataclasses.replace(ft_cfg, seed=args.seed + seed, **kd))
                ft_times.append(time.perf_counter() - t0)
                accs.append(evaluate_dataset(tuned, test)["accuracy"])
            row = {"target": target, "variant": name, "macs": _macs(tuned, x1), "after_prune": after,
                   "after_bn_recal": after_recal, "after_ft": sum(accs) / len(accs), "after_ft_min": min(accs),
                   "after_ft_max": max(accs), "after_ft_all": accs,
                   "latency_ms": measure_latency(tuned, xb, repeats=30), "prune_s": prune_s,
                   "ft_s": sum(ft_times) / len(ft_times)}
            rows.append(row)
            print(f"{target:.3f} {name:14s} macs {row['macs'] / macs0:.3f}  pruned {after:.4f}  "
                  f"bn-recal {after_recal:.4f}  fine-tuned {accs}", flush=True)

    table = markdown_table(
        ["MACs target", "variant", "MACs kept", "acc. right after pruning", "… with BN re-estimated",
         f"after {args.ft_epochs} fine-tune epochs, mean of {args.ft_seeds} seeds (min–max)", "latency bs64 (ms)", "speedup", "prune (s)", "train (s)"],
        [[f"{r['target']:.3f}", r["variant"], f"{r['macs'] / macs0:.3f}", f"{100 * r['after_prune']:.1f}%",
          f"{100 * r['after_bn_recal']:.1f}%",
          f"{100 * r['after_ft']:.1f}%" + (f" ({100 * r['after_ft_min']:.1f}–{100 * r['after_ft_max']:.1f})"
                                          if "after_ft_min" in r else ""), f"{r['latency_ms']:.2f}",
          f"{lat0 / r['latency_ms']:.2f}x", f"{r['prune_s']:.1f}",
          "cached" if r["ft_s"] is None else f"{r['ft_s']:.0f}"] for r in rows])
    notes = (f"Dense training: {args.epochs} epochs, SGD (Nesterov, momentum 0.9) lr {args.lr} cosine, batch 64, "
             f"weight decay 5e-4; slimming adds {args.slim_strength} x sum|gamma|. Fine-tuning: the same optimizer "
             f"at lr {args.ft_lr} for {args.ft_epochs} epochs, {args.ft_seeds} seeds; KD weight 0.5, temperature 4, "
             "teacher = the plain dense model. "
             "'with BN re-estimated' runs 8 training batches through the pruned model in train mode "
             "(no gradient step); fine-tuning starts from that model. MNIST-5k: 4,000 training / 1,000 test images, "
             "shuffled with seed 0.")
    write_results("recovery", "Prune and recover on MNIST-5k (ResNet-20-style CNN)", table, rows, notes)


if __name__ == "__main__":
    main()
