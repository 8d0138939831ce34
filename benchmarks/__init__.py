"""Benchmarks for lightning_patterning (run as modules, e.g. ``python -m benchmarks.bench_llc``)."""
