"""Pure scoring functions: they read tensors and statistics, never change a model."""

from .elementwise import ELEMENT_IMPORTANCE, element_scores

__all__ = ["ELEMENT_IMPORTANCE", "element_scores"]
