"""Benchmarks that need more than a network: the transfer benchmark (DEX vs monolithic MAE vs scratch)."""

from dex_monai.benchmark.transfer import TASKS, BenchmarkConfig, run_transfer_benchmark

__all__ = ["TASKS", "BenchmarkConfig", "run_transfer_benchmark"]
