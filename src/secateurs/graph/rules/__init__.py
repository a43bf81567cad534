"""The built-in tracer rules, by kind; importing this package registers them (see ``..registry``)."""

from . import attention, detection, elementwise, layers, shape

__all__ = ["attention", "detection", "elementwise", "layers", "shape"]
