"""Benchmark runners (POPE, CHAIR): batched, resumable A/B generation around the scorers.

``pope.run`` and ``chair.run`` take a validated run config (:mod:`.config`);
``benchmarks/pope.py`` and ``benchmarks/chair.py`` only turn their flags into one
(:mod:`vlsae_guard.cli.bench_flags`) and call into here. The metrics themselves are pure
functions in :mod:`vlsae_guard.scoring`.
"""
