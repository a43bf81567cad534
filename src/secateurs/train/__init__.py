"""Training, evaluation and recovery loops."""

from .basic import evaluate, fit
from .recalibrate import recalibrate_bn_

__all__ = ["evaluate", "fit", "recalibrate_bn_"]
