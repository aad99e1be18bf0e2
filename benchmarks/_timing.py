"""Timing shared by the benchmark scripts (imported as a sibling: run them as scripts)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any


def median_times(
    fns: Sequence[Callable[..., Any]],
    warmup: int,
    repeats: int,
    setups: Sequence[Callable[[], AbstractContextManager]] | None = None,
) -> list[tuple[float, Any]]:
    """Median wall time and last output of each function, calls interleaved.

    Interleaving spreads machine noise (shared cores, memory bandwidth) over all candidates
    instead of biasing whichever happened to run during a slow spell. With ``setups``, each call
    runs as ``with setups[i]() as value: fns[i](value)``, the ``with`` outside the timed span
    (e.g. attaching a method that cannot stay attached while the others run).
    """

    def call(i: int) -> tuple[float, Any]:
        if setups is None:
            return _timed(fns[i])
        with setups[i]() as value:
            return _timed(fns[i], value)

    for _ in range(warmup):
        for i in range(len(fns)):
            call(i)
    times: list[list[float]] = [[] for _ in fns]
    outs: list[Any] = [None] * len(fns)
    for _ in range(repeats):
        for i in range(len(fns)):
            seconds, outs[i] = call(i)
            times[i].append(seconds)
    return [(statistics.median(ts), out) for ts, out in zip(times, outs, strict=True)]


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out
