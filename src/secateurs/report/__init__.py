"""Human-readable output: tables, charts and self-contained HTML reports."""

from .table import before_after_table, format_table, human_bytes, human_count, layer_table

__all__ = ["before_after_table", "format_table", "human_bytes", "human_count", "layer_table"]
