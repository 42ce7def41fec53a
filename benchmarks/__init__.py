"""Benchmarks of ``implicit`` against torchdeq, a hand-written loop, scipy and unrolled backprop.

Run ``python -m benchmarks.run`` from the repository root (see ``benchmarks/README.md``).
"""
