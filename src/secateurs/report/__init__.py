"""Human-readable output: tables now; HTML reports and plots later."""

from .table import before_after_table, format_table, human_bytes, human_count, layer_table

__all__ = ["before_after_table", "format_table", "human_bytes", "human_count", "layer_table"]
