"""Benchmarks of hybrid-lora: layer microbenchmarks, rank sweep, memory, end-to-end training, Hopper compile report.

Run a module with ``python -m bench.<module>`` from the repository root; ``bench/gpu_check``
runs the set that matters on a GPU and writes ``bench/results/<device>-<date>.{csv,md}``.
"""
