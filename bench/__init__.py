"""Benchmarks, probes and the reproduction harness; each module runs as ``python -m bench.NAME``.

Figures they print are recorded, with the exact command, in ``docs/PERFORMANCE.md`` (speed and
memory) and ``docs/RESULTS.md`` (what the models score).
"""
