"""Which tensor dimensions are coupled: tracing and channel groups (never touches weights).

The tracer's rules are an open registry: :func:`rule` teaches it a custom op.
"""

from .groups import DependencyGraph, Group, Member, build_graph
from .registry import UnknownCall, remove_rule, rule
from .trace import LabelTrace, Tracer, trace_labels

__all__ = ["DependencyGraph", "Group", "LabelTrace", "Member", "Tracer", "UnknownCall", "build_graph", "remove_rule",
           "rule", "trace_labels"]
