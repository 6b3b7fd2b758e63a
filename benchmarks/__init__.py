"""Benchmarks: each prints our numbers beside the PyTorch/transformers baseline of the same run."""
