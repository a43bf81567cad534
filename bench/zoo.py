"""Channel pruning across model zoos (random init, default settings).

For every model in ``torchvision.models.list_models(module=torchvision.models)``
(or, with ``--timm``, a broad set of timm families): prune at ratio 0.5 with no
per-model configuration, then check the forward pass and the output shape, and
record MACs/params before and after and the prune time. Run from the repository root:

    python bench/zoo.py [--models resnet18,vit_b_16] [--ratio 0.5]
    python bench/zoo.py --timm
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import secateurs  # noqa: E402
from _common import markdown_table, write_results  # noqa: E402

SIZES = {"inception_v3": 299}
TIMM = [
    "resnet50", "resnext50_32x4d", "seresnet50", "resnetv2_50", "efficientnet_b0", "efficientnetv2_rw_t",
    "mobilenetv3_large_100", "mobilenetv2_100", "convnext_tiny", "convnextv2_atto", "vit_tiny_patch16_224",
    "vit_small_patch16_224", "deit_tiny_patch16_224", "deit_small_distilled_patch16_224", "swin_tiny_patch4_window7_224",
    "regnety_002", "regnetx_002", "ghostnet_100", "densenet121", "dla34", "cspresnet50", "cspdarknet53",
    "levit_128s", "mixer_b16_224", "poolformer_s12", "rexnet_100", "dpn68", "hrnet_w18_small", "inception_v4",
    "xception41", "tf_efficientnet_lite0", "mobilevit_xs", "edgenext_xx_small", "coat_lite_tiny", "pvt_v2_b0",
    "repvgg_a0", "res2net50_26w_4s", "tresnet_m", "nfnet_l0", "beit_base_patch16_224",
]


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return model.eval(), torch.randn(1, *size)
    import torchvision

    model = torchvision.models.get_model(name)
    return model.eval(), torch.randn(1, 3, SIZES.get(name, 224), SIZES.get(name, 224))


def run(name: str, ratio: float) -> dict:
    torch.manual_seed(0)
    model, x = build(name)
    row: dict = {"model": name}
    try:
        with torch.no_grad():
            ref_shape = tuple(model(x).shape)
        before = secateurs.analyze(model, x, latency=False, size=False)
        start = time.perf_counter()
        report = secateurs.prune_(model, secateurs.Channels(ratio=ratio), example_inputs=x)
        row["prune_seconds"] = time.perf_counter() - start
        with torch.no_grad():
            shape = tuple(model(x).shape)
        after = secateurs.analyze(model, x, latency=False, size=False)
        row.update(
            ok=shape == ref_shape,
            macs_before=before.macs, macs_after=after.macs, params_before=before.params,
            params_after=after.params,
            not_understood=sorted(k.removeprefix("call ") for k in report.skipped if k.startswith("call ")),
        )
    except Exception as exc:  # the benchmark records failures instead of stopping
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
    return row


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=None)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--timm", action="store_true", help="the timm families instead of torchvision")
    args = parser.parse_args()
    if args.models:
        names = args.models.split(",")
    elif args.timm:
        names = ["timm:" + n for n in TIMM]
    else:
        names = torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        row = run(name, args.ratio)
        rows.append(row)
        gc.collect()
        print({k: v for k, v in row.items()}, flush=True)
    table = markdown_table(
        ["model", "ok", "MACs before", "MACs after", "MACs ratio", "params ratio", "prune (s)", "not understood / error"],
        [[r["model"], "yes" if r.get("ok") else "**no**",
          f"{r['macs_before'] / 1e9:.2f}G" if "macs_before" in r else "-",
          f"{r['macs_after'] / 1e9:.2f}G" if "macs_after" in r else "-",
          f"{r['macs_after'] / r['macs_before']:.2f}" if "macs_before" in r else "-",
          f"{r['params_after'] / r['params_before']:.2f}" if "params_before" in r else "-",
          f"{r['prune_seconds']:.1f}" if "prune_seconds" in r else "-",
          r.get("error") or ", ".join(r.get("not_understood", []))] for r in rows],
    )
    ok = sum(1 for r in rows if r.get("ok"))
    under10 = sum(1 for r in rows if r.get("ok") and r["prune_seconds"] < 10)
    notes = (f"{ok}/{len(rows)} models pruned and ran with the original output shape; {under10} of them in under "
             "10 s. 'not understood' lists calls the graph could not follow: tensors through them were kept "
             "whole (a MACs ratio near 1.0 means little could be pruned).")
    zoo = "timm" if args.timm else "torchvision"
    write_results("zoo" if zoo == "torchvision" else "zoo_timm", f"{zoo} zoo, channel pruning at ratio {args.ratio}",
                  table, rows, notes)


if __name__ == "__main__":
    main()
