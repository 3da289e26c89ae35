"""Benchmarks of cgc-tf: step time and memory, explanation latency, input pipeline.

Run as modules from the repository root, e.g. `python -m benchmarks.step_time`;
see docs/performance.md for the commands and measured numbers.
"""
