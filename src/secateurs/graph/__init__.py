"""Which tensor dimensions are coupled: tracing and channel groups (never touches weights)."""

from .groups import DependencyGraph, Group, Member, build_graph
from .trace import LabelTrace, trace_labels

__all__ = ["DependencyGraph", "Group", "LabelTrace", "Member", "build_graph", "trace_labels"]
