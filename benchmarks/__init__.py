"""Reproducible measurements; the README's tables quote benchmarks/results/*.json."""
