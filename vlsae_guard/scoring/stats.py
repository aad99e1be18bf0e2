"""Significance for paired A/B runs: exact McNemar and paired bootstrap intervals.

Every benchmark metric here is a *pooled ratio*: a sum over items of a numerator divided by a
sum of a denominator (POPE's F1 is 2TP / (2TP + FP + FN), CHAIR_i is hallucinated mentions /
mentions). A metric is therefore given as one numerator and one denominator per item
(:data:`Ratios`), and a bootstrap replicate is the same ratio under resampling weights. The two
arms are resampled with the *same* items (paired), which is what makes small differences
between arms detectable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# metric name -> (numerator per item, denominator per item, scale); value = scale * sum / sum.
Ratios = Mapping[str, tuple[np.ndarray, np.ndarray, float]]

DEFAULT_BOOTSTRAP = 10_000
_CHUNK = 500


def discordant(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, int]:
    """McNemar's discordant pairs of arms A and B: the only items its test looks at."""
    pairs = list(zip(a_correct, b_correct, strict=True))
    return {
        "a_right_b_wrong": sum(x and not y for x, y in pairs),
        "a_wrong_b_right": sum(y and not x for x, y in pairs),
    }


def mcnemar_p(counts: Mapping[str, int]) -> float:
    """Two-sided exact McNemar p-value from :func:`discordant` counts (summable over runs)."""
    b, c = counts["a_right_b_wrong"], counts["a_wrong_b_right"]
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired outcomes of arms A and B."""
    return mcnemar_p(discordant(a_correct, b_correct))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (as the point metrics define an empty ratio)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def pooled(ratios: Ratios) -> dict[str, float]:
    """The point value of each metric."""
    return {k: float(s * _ratio(n.sum(), d.sum())) for k, (n, d, s) in ratios.items()}


def replicates(
    arms: Sequence[Ratios], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Bootstrap replicates (``n_boot`` values per metric) of each arm, resampled jointly.

    All arms must describe the same items in the same order; each replicate draws one set of
    items (with replacement) and evaluates every arm on it. Deterministic given ``seed``.
    """
    n = {len(num) for ratios in arms for num, _, _ in ratios.values()}
    if len(n) != 1:
        raise ValueError(f"arms must cover the same items, got sizes {sorted(n)}")
    (n,) = n
    if n == 0:
        raise ValueError("cannot bootstrap zero items")
    columns, slots = [], []
    for ratios in arms:
        slot = {}
        for name, (num, den, scale) in ratios.items():
            slot[name] = (len(columns), len(columns) + 1, scale)
            columns += [np.asarray(num, dtype=float), np.asarray(den, dtype=float)]
        slots.append(slot)
    matrix = np.stack(columns, axis=1)  # (items, 2 * metrics)
    rng = np.random.default_rng(seed)
    sums = []
    for start in range(0, n_boot, _CHUNK):
        rows = min(_CHUNK, n_boot - start)
        picks = rng.integers(0, n, size=(rows, n))
        offsets = (picks + n * np.arange(rows)[:, None]).ravel()
        weights = np.bincount(offsets, minlength=rows * n).reshape(rows, n)
        sums.append(weights @ matrix)
    totals = np.concatenate(sums)
    return [
        {name: scale * _ratio(totals[:, i], totals[:, j]) for name, (i, j, scale) in slot.items()}
        for slot in slots
    ]


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_comparison(
    a: Ratios, b: Ratios, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95
) -> dict:
    """Point values of both arms, B - A, and paired bootstrap intervals for all three."""
    rep_a, rep_b = replicates([a, b], n_boot, seed)
    va, vb = pooled(a), pooled(b)
    return {
        "a": va,
        "b": vb,
        "delta": {k: vb[k] - va[k] for k in va},
        "ci_a": {k: interval(rep_a[k], level) for k in va},
        "ci_b": {k: interval(rep_b[k], level) for k in va},
        "ci_delta": {k: interval(rep_b[k] - rep_a[k], level) for k in va},
        "bootstrap": {"replicates": n_boot, "seed": seed, "level": level, "method": "percentile"},
    }
