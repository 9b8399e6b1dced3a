"""Cost of KernelWarehouse models: multiply-adds that see weight assembly, and a benchmark."""
from .macs import MacCount, count_macs

__all__ = ["MacCount", "count_macs"]
