"""Timing shared by the benchmark scripts (imported as a sibling: run them as scripts)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def median_times(
    fns: Sequence[Callable[[], Any]], warmup: int, repeats: int
) -> list[tuple[float, Any]]:
    """Median wall time and last output of each function, calls interleaved.

    Interleaving spreads machine noise (shared cores, memory bandwidth) over all candidates
    instead of biasing whichever happened to run during a slow spell.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    outs: list[Any] = []
    for _ in range(repeats):
        outs = []
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            outs.append(fn())
            ts.append(time.perf_counter() - start)
    return [(statistics.median(ts), out) for ts, out in zip(times, outs, strict=True)]
