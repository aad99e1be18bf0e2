"""Paired bootstrap intervals: deterministic, centred on the estimate, paired."""

import numpy as np
import pytest

from vlsae_guard.scoring import stats


def _arms(n=300, seed=0):
    rng = np.random.default_rng(seed)
    a = (rng.random(n) < 0.6).astype(float)
    b = np.where(rng.random(n) < 0.9, a, 1 - a)  # mostly the same items right
    one = np.ones(n)
    return {"acc": (a, one, 100.0)}, {"acc": (b, one, 100.0)}


def test_interval_contains_the_point_estimate_and_is_deterministic():
    a, b = _arms()
    first = stats.paired_comparison(a, b, n_boot=2000, seed=5)
    again = stats.paired_comparison(a, b, n_boot=2000, seed=5)
    assert first == again
    for key, value in (("ci_a", first["a"]), ("ci_b", first["b"]), ("ci_delta", first["delta"])):
        lo, hi = first[key]["acc"]
        assert lo <= value["acc"] <= hi and lo < hi
    other = stats.paired_comparison(a, b, n_boot=2000, seed=6)
    assert other["ci_delta"] != first["ci_delta"]


def test_pairing_narrows_the_interval_of_the_difference():
    a, b = _arms()
    paired = stats.paired_comparison(a, b, n_boot=2000, seed=0)
    rep_a = stats.replicates([a], 2000, seed=1)[0]["acc"]
    rep_b = stats.replicates([b], 2000, seed=2)[0]["acc"]
    unpaired = stats.interval(rep_b - rep_a)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(paired["ci_delta"]["acc"]) < 0.6 * width(unpaired)


def test_identical_arms_have_a_zero_difference():
    a, _ = _arms()
    result = stats.paired_comparison(a, a, n_boot=500, seed=0)
    assert result["delta"]["acc"] == 0 and result["ci_delta"]["acc"] == (0.0, 0.0)


def test_pooled_ratio_with_an_empty_denominator_is_zero():
    zero = np.zeros(4)
    assert stats.pooled({"p": (zero, zero, 100.0)}) == {"p": 0.0}


def test_replicates_need_the_same_items():
    a, _ = _arms(10)
    b, _ = _arms(12)
    with pytest.raises(ValueError, match="same items"):
        stats.replicates([a, b], 10)
