"""Training and evaluation loops."""

from .basic import evaluate, fit

__all__ = ["evaluate", "fit"]
