"""POPE: yes/no answer parsing, metrics, and the paired A/B comparison.

Parsing follows LLaVA's and POPE's own evaluation: keep the text before the first ".", drop
commas, split on spaces, answer "no" if any word is ``No``, ``not`` or ``no``, else "yes".
``strict=True`` instead accepts only an exact (case-insensitive) "yes"/"no" and marks anything
else as unparsed (None), which then counts as wrong in accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PROMPTS = {
    "llava": "{question}\nAnswer the question using a single word or phrase.",
    "vcd": "{question} Please answer this question with one word.",
}
NEGATIONS = frozenset({"No", "not", "no"})


def build_prompt(question: str, style: str = "llava") -> str:
    return PROMPTS[style].format(question=question)


def parse_answer(text: str, strict: bool = False) -> str | None:
    """Map a model's answer to "yes"/"no" (None: unparsed, strict mode only)."""
    if strict:
        word = text.strip().strip(".").strip().lower()
        return word if word in ("yes", "no") else None
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in NEGATIONS for w in words) else "yes"


def metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes") and yes-ratio, in percent."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(
            f"need equally many predictions and labels, got {len(predictions)} and {len(labels)}"
        )
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p != "yes" and y == "yes" for p, y in pairs)
    correct = sum(p == y for p, y in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    yes = sum(p == "yes" for p in predictions)
    return {
        "accuracy": 100 * correct / len(pairs),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": 100 * yes / len(pairs),
    }


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired outcomes of arms A and B."""
    b = sum(x and not y for x, y in zip(a_correct, b_correct, strict=True))
    c = sum(y and not x for x, y in zip(a_correct, b_correct, strict=True))
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(
    answers_a: Sequence[str | None], answers_b: Sequence[str | None], labels: Sequence[str]
) -> dict:
    """Metrics of both arms, their difference (B - A) and McNemar's p on correctness."""
    ma, mb = metrics(answers_a, labels), metrics(answers_b, labels)
    right_a = [p == y for p, y in zip(answers_a, labels, strict=True)]
    right_b = [p == y for p, y in zip(answers_b, labels, strict=True)]
    return {
        "a": ma,
        "b": mb,
        "delta": {k: mb[k] - ma[k] for k in ma},
        "mcnemar_p": mcnemar_exact(right_a, right_b),
        "flips": sum(x != y for x, y in zip(answers_a, answers_b, strict=True)),
        "n": len(labels),
    }
