"""POPE scoring: LLaVA's parser, the metrics, McNemar's exact test."""

import json
import math
import random

import pytest

from vlsae_guard.scoring import pope, stats
from vlsae_guard.scoring.files import DataError


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


# --- question files -----------------------------------------------------------------------


@pytest.mark.parametrize("dataset", list(pope.DATASETS))
@pytest.mark.parametrize("split", pope.SPLITS)
def test_every_shipped_file_loads(dataset, split):
    qs = pope.load_questions(f"{dataset}/{split}")
    expected = 2910 if (dataset, split) == ("coco_llava", "random") else 3000
    assert len(qs.questions) == expected
    assert qs.name == f"{dataset}/{split}" and qs.version == pope.DATASETS[dataset].version
    assert sum(q.label == "yes" for q in qs.questions) == 1500
    assert len({q.question_id for q in qs.questions}) == expected


def test_the_two_coco_versions_differ():
    old = pope.load_questions("coco_llava/random").questions
    new = pope.load_questions("coco/random").questions
    assert sum("imange" in q.text for q in old) > 0
    assert not any("imange" in q.text for q in new)
    assert [q.text for q in old[:50]] != [q.text for q in new[:50]]


def test_a_copied_shipped_file_is_recognised(tmp_path):
    copy = tmp_path / "coco_pope_popular.json"
    copy.write_bytes(pope.shipped_path("coco", "popular").read_bytes())
    qs = pope.load_questions(copy)
    assert qs.name == "coco/popular" and qs.version is not None


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


Q = [
    {"question_id": i, "image": f"im{i // 2}.jpg", "text": f"Is there a thing{i}?", "label": lab}
    for i, lab in enumerate(["yes", "no", "yes", "no", "yes", "no"], start=1)
]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda rows: rows[2].pop("label"), r"q\.jsonl:3: missing key 'label'"),
        (lambda rows: rows[3].update(label="Yes"), r"q\.jsonl:4: label must be"),
        (lambda rows: rows[4].update(question_id=2), r"q\.jsonl:5: question_id 2 already used"),
        (lambda rows: rows[1].update(image=7), r"q\.jsonl:2: 'image' must be str"),
    ],
)
def test_bad_questions_name_file_and_line(tmp_path, change, message):
    rows = [dict(r) for r in Q]
    change(rows)
    path = _write(tmp_path / "q.jsonl", rows)
    with pytest.raises(DataError, match=message):
        pope.load_questions(path)


def test_malformed_line_in_question_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(Q[0]) + "\n" + json.dumps(Q[1])[:-3] + "\n")
    with pytest.raises(DataError, match=r"q\.jsonl:2: not valid JSON"):
        pope.load_questions(path)


def test_unknown_shipped_name_lists_the_choices():
    with pytest.raises(DataError, match="coco_llava/"):
        pope.load_questions("coco_pope_random.json")


# --- scoring files ------------------------------------------------------------------------


def eval_pope_reference(answers: list[dict], labels: list[str]) -> dict:
    """LLaVA's llava/eval/eval_pope.py, transcribed (answers in question order)."""
    preds = []
    for answer in answers:
        text = answer["text"]
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    gold = [0 if lab == "no" else 1 for lab in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold, strict=True))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, gold, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, gold, strict=True))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {
        "accuracy": 100 * (tp + tn) / (tp + tn + fp + fn),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * 2 * precision * recall / (precision + recall),
        "yes_ratio": 100 * preds.count(1) / len(preds),
    }


ANSWER_TEXTS = [
    "Yes", "No", "yes.", "No, there is not.", "There is no dog.", "Yes, there is a cat.",
    "I do not see one", "NO", "Nope", "yes. No.", "not sure", "",
]  # fmt: skip


def test_score_files_equals_llavas_eval_pope_matched_by_id(tmp_path):
    rng = random.Random(0)
    qs = pope.load_questions("coco_llava/adversarial")
    answers = [
        {"question_id": q.question_id, "prompt": q.text, "text": rng.choice(ANSWER_TEXTS)}
        for q in qs.questions
    ]
    expected = eval_pope_reference(answers, [q.label for q in qs.questions])
    rng.shuffle(answers)  # matched by question_id, not by order
    path = _write(tmp_path / "answers.jsonl", answers)
    result = pope.score_files(["coco_llava/adversarial"], [path])
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9)
    assert result["n"] == 3000 and result["unanswered"] == 0


def test_missing_answers_are_an_error_or_counted(tmp_path):
    qs_path = _write(tmp_path / "q.jsonl", Q)
    answers = [{"question_id": r["question_id"], "text": "Yes"} for r in Q if r["question_id"] != 4]
    path = _write(tmp_path / "a.jsonl", answers)
    with pytest.raises(DataError, match=r"no answer for 1 of 6 questions .*question_id 4\)"):
        pope.score_files([qs_path], [path])
    result = pope.score_files([qs_path], [path], allow_missing=True)
    assert result["unanswered"] == 1
    assert result["accuracy"] == pytest.approx(100 * 3 / 6)  # 3 yes right; "no" for 4 missing
    assert result["yes_ratio"] == pytest.approx(100 * 5 / 6)


def test_extra_and_duplicate_answers_are_errors(tmp_path):
    qs_path = _write(tmp_path / "q.jsonl", Q)
    rows = [{"question_id": r["question_id"], "text": "No"} for r in Q]
    extra = _write(tmp_path / "extra.jsonl", [*rows, {"question_id": 99, "text": "No"}])
    with pytest.raises(
        DataError, match=r"1 answers have a question_id that is not in .*99 \(line 7\)"
    ):
        pope.score_files([qs_path], [extra])
    twice = _write(tmp_path / "twice.jsonl", [*rows, rows[2]])
    with pytest.raises(
        DataError, match=r"twice\.jsonl:7: question_id 3 already answered on line 3"
    ):
        pope.score_files([qs_path], [twice])


def test_answers_to_another_version_are_caught(tmp_path):
    new = pope.load_questions("coco/popular").questions
    old = pope.load_questions("coco_llava/popular").questions
    answers = [{"question_id": q.question_id, "prompt": q.text, "text": "Yes"} for q in old]
    path = _write(tmp_path / "a.jsonl", answers)
    assert [q.question_id for q in new] == [q.question_id for q in old]
    with pytest.raises(DataError, match="other questions than"):
        pope.score_files(["coco/popular"], [path])
    assert pope.score_files(["coco/popular"], [path], check_prompts=False)["n"] == 3000


def test_several_splits_give_the_mean_f1(tmp_path):
    first = _write(tmp_path / "first.jsonl", Q[:3])
    second = _write(tmp_path / "second.jsonl", Q[3:])
    answers = _write(
        tmp_path / "a.jsonl", [{"question_id": r["question_id"], "text": "Yes"} for r in Q]
    )
    result = pope.score_files([first, second], [answers])  # one answers file, ids disjoint
    f1s = [result["splits"][name]["f1"] for name in ("first", "second")]
    assert result["mean_f1"] == pytest.approx(sum(f1s) / 2)
    with pytest.raises(DataError, match="question_id 1 is in both"):
        pope.score_files([first, first], [answers])


def test_ratios_reproduce_the_metrics():
    rng = random.Random(1)
    preds = [rng.choice(["yes", "no", None]) for _ in range(200)]
    labels = [rng.choice(["yes", "no"]) for _ in range(200)]
    pooled = stats.pooled(pope.ratios(preds, labels))
    for key, value in pope.metrics(preds, labels).items():
        assert pooled[key] == pytest.approx(value)


def test_compare_splits_mean_f1_interval_is_deterministic():
    rng = random.Random(2)
    labels = {s: [rng.choice(["yes", "no"]) for _ in range(120)] for s in ("a", "b")}
    a = {s: [rng.choice(["yes", "no"]) for _ in y] for s, y in labels.items()}
    b = {
        s: [p if rng.random() < 0.8 else y for p, y in zip(a[s], labels[s], strict=True)]
        for s in labels
    }
    one = pope.compare_splits(labels, a, b, n_boot=500, seed=3)
    two = pope.compare_splits(labels, a, b, n_boot=500, seed=3)
    assert one["mean_f1"] == two["mean_f1"]
    lo, hi = one["mean_f1"]["ci_delta"]
    assert lo <= one["mean_f1"]["delta"] <= hi
    assert one["mean_f1"]["a"] == pytest.approx(
        (one["splits"]["a"]["a"]["f1"] + one["splits"]["b"]["a"]["f1"]) / 2
    )


def test_a_bare_shipped_file_name_resolves_to_the_version_the_answers_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = pope.load_questions("coco_llava/random").questions
    rows = [{"question_id": q.question_id, "prompt": q.text, "text": "Yes"} for q in old]
    path = _write(tmp_path / "a.jsonl", rows)
    assert pope.score_files(["coco_pope_random.json"], [path])["questions"][0]["name"] == (
        "coco_llava/random"  # 2910 answers: only the older file fits
    )
    new = pope.load_questions("coco/popular").questions
    bare = _write(tmp_path / "b.jsonl", [{"question_id": q.question_id, "text": "No"} for q in new])
    with pytest.raises(DataError, match="the answers fit both"):
        pope.score_files(["coco_pope_popular.json"], [bare])
