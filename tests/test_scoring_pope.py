"""POPE scoring: LLaVA's parser, the metrics, McNemar's exact test."""

import math

import pytest

from vlsae_guard.scoring import pope


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is not a dog in the image.", "no"),
        ("Yes. No dog is visible though.", "yes"),  # only the first sentence counts
        ("No, there isn't.", "no"),  # comma dropped before splitting
        ("NO", "yes"),  # case-sensitive, as in LLaVA's eval script
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_llava_parser(text, expected):
    assert pope.parse_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("Yes", "yes"), ("no.", "no"), (" NO ", "no"), ("Yes, there is.", None), ("", None)],
)
def test_strict_parser(text, expected):
    assert pope.parse_answer(text, strict=True) == expected


def test_prompts():
    assert pope.build_prompt("Is there a cat?") == (
        "Is there a cat?\nAnswer the question using a single word or phrase."
    )
    assert pope.build_prompt("Q?", "vcd") == "Q? Please answer this question with one word."


def test_metrics_by_hand():
    preds = ["yes", "yes", "no", "no", "yes", None]
    labels = ["yes", "no", "yes", "no", "yes", "yes"]
    m = pope.metrics(preds, labels)
    tp, fp, fn = 2, 1, 2
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert m["accuracy"] == pytest.approx(100 * 3 / 6)
    assert m["precision"] == pytest.approx(100 * precision)
    assert m["recall"] == pytest.approx(100 * recall)
    assert m["f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert m["yes_ratio"] == pytest.approx(100 * 3 / 6)


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="equally many"):
        pope.metrics(["yes"], ["yes", "no"])


def test_mcnemar_exact_values():
    # 10 discordant pairs, 1 vs 9: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = [True] * 9 + [False] + [True] * 5
    b = [False] * 9 + [True] + [True] * 5
    assert pope.mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10) / 2**10)
    assert pope.mcnemar_exact(a, a) == 1.0
    assert pope.mcnemar_exact([True, False], [False, True]) == 1.0


def test_compare_reports_delta_and_flips():
    labels = ["yes", "no", "no", "yes"]
    result = pope.compare(["yes", "yes", "yes", "yes"], ["yes", "no", "no", "yes"], labels)
    assert result["delta"]["accuracy"] == pytest.approx(50.0)
    assert result["flips"] == 2 and result["n"] == 4
    assert math.isclose(result["mcnemar_p"], 0.5)
