"""Benchmark runners (POPE, CHAIR): batched, resumable A/B generation around the scorers.

``benchmarks/pope.py`` and ``benchmarks/chair.py`` only parse arguments and call into here;
the metrics themselves are pure functions in :mod:`vlsae_guard.scoring`.
"""
