"""Cost of KernelWarehouse models: multiply-adds that see weight assembly, and a benchmark."""

from .benchmark import benchmark, format_table, peak_memory
from .macs import MacCount, count_macs

__all__ = ["MacCount", "benchmark", "count_macs", "format_table", "peak_memory"]
