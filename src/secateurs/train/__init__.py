"""Training, evaluation and recovery: regularisers, schedules, fine-tuning with distillation."""

from .basic import evaluate, fit
from .recalibrate import recalibrate_bn_
from .regularize import GroupLassoRegularizer, SlimmingRegularizer, make_regularizer
from .schedule import AGP, GradualPruner
from .trainer import FinetuneConfig, FinetuneResult, evaluate_dataset, finetune

__all__ = [
    "AGP",
    "FinetuneConfig",
    "FinetuneResult",
    "GradualPruner",
    "GroupLassoRegularizer",
    "SlimmingRegularizer",
    "evaluate",
    "evaluate_dataset",
    "finetune",
    "fit",
    "make_regularizer",
    "recalibrate_bn_",
]
