"""Re-estimate BatchNorm statistics after structural surgery.

Pruning changes what every BatchNorm sees; its running mean/var still describe
the dense model. A few forward passes in train mode (no gradients, no weight
change) give exact statistics of the pruned network, which often recovers most
of the one-shot accuracy loss (as noted by EagleEye, Li et al. 2020).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SecateursError
from ..importance.stats import split_batch
from ..selection import call_model
from ..utils import eval_mode

__all__ = ["recalibrate_bn_"]


def recalibrate_bn_(model: nn.Module, data: Iterable[Any], batches: int = 32) -> int:
    """Reset and re-estimate the running statistics of every BatchNorm on up to ``batches`` batches.

    Only BatchNorm layers run in train mode (dropout stays off); the average
    is cumulative, not a moving one. Returns the number of batches used.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    used = 0
    with torch.no_grad(), eval_mode(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
            m.train()
        try:
            for i, batch in enumerate(data):
                if i >= batches:
                    break
                call_model(model, split_batch(batch)[0])
                used += 1
        except BaseException:
            for m, state in zip(norms, saved, strict=True):
                m.load_state_dict(state)  # a failed pass must not leave half-estimated statistics
            raise
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
    if not used:
        for m, state in zip(norms, saved, strict=True):
            m.load_state_dict(state)  # nothing lost: the old statistics come back
        raise SecateursError("BatchNorm recalibration needs at least one batch of data: pass data= (CLI: --data)")
    return used
