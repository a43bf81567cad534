"""A plain supervised loop over in-memory tensors (demo and quick recovery)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fit", "evaluate"]


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> nn.Module:
    """Train with AdamW and a cosine schedule; masks on the model keep pruned weights at zero."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 512) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)`` (eval mode)."""
    from torch.utils.data import TensorDataset

    from .trainer import evaluate_dataset

    scores = evaluate_dataset(model, TensorDataset(x, y), batch_size=batch_size)
    return {"accuracy": scores["accuracy"], "loss": scores["loss"]}
