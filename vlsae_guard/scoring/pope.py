"""POPE: question files, yes/no answer parsing, metrics, and the paired A/B comparison.

Scoring reproduces LLaVA's ``llava/eval/eval_pope.py`` (itself POPE's ``evaluate.py``): keep
the text before the first ".", drop commas, split on single spaces, and answer "no" if any word
is exactly ``No``, ``not`` or ``no``, else "yes" (so "NO", "Nope" and "" count as "yes", as
there). Metrics are in percent with "yes" as the positive class; LLaVA reports the F1 averaged
over COCO's random, popular and adversarial splits.

``strict=True`` instead accepts only an exact answer "yes" or "no" (case-insensitive, surrounding
whitespace and one trailing period ignored) and leaves anything else unparsed (None). An
unparsed answer is never correct and never a "yes": it lowers accuracy and recall but not
precision. Use it to see how much of a score rests on the lenient parser.

Answers are matched to questions by ``question_id``, never by order. A question without an
answer is an error naming it, unless ``allow_missing``: then it is scored like an unparsed
answer and counted as ``unanswered``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from ..provenance import sha256_file
from . import stats
from .files import DataError, data_path, format_ids, read_records, require
from .stats import mcnemar_exact  # noqa: F401  (part of this module's API: pope.mcnemar_exact)

PROMPTS = {
    "llava": "{question}\nAnswer the question using a single word or phrase.",
    "vcd": "{question} Please answer this question with one word.",
}
NEGATIONS = frozenset({"No", "not", "no"})
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
SPLITS = ("random", "popular", "adversarial")
PARSERS = {
    False: "llava: first sentence, commas dropped, 'no' if any word is No/not/no, else 'yes'",
    True: "strict: exactly yes/no (case-insensitive), anything else unparsed and wrong",
}
# What an empty answer counts as, for the warning a results file carries when there are any.
EMPTY_MEANS = {
    False: "LLaVA's parser scores an empty answer as 'yes'",
    True: "the strict parser scores an empty answer as unparsed (wrong)",
}


@dataclass(frozen=True)
class Dataset:
    """A family of shipped question files, one per split."""

    pattern: str  # path under vlsae_guard/scoring/data/pope, with {split}
    version: str
    images: str  # which image set the ``image`` names refer to


DATASETS = {
    "coco": Dataset(
        "coco/coco_pope_{split}.json",
        "RUCAIBox/POPE commit 3df3ba1 output/coco (current; 3000 questions per split)",
        "COCO val2014",
    ),
    "coco_llava": Dataset(
        "coco_llava_e3e3926/coco_pope_{split}.json",
        "RUCAIBox/POPE commit e3e3926 (LLaVA-1.5's published numbers; random has 2910)",
        "COCO val2014",
    ),
    "aokvqa": Dataset(
        "aokvqa/aokvqa_pope_seem_{split}.json", "RUCAIBox/POPE output/seem/aokvqa", "COCO val2014"
    ),
    "gqa": Dataset("gqa/gqa_pope_seem_{split}.json", "RUCAIBox/POPE output/seem/gqa", "GQA"),
}


def build_prompt(question: str, style: str = "llava") -> str:
    return PROMPTS[style].format(question=question)


def parse_answer(text: str, strict: bool = False) -> str | None:
    """Map a model's answer to "yes"/"no" (None: unparsed, strict mode only)."""
    if strict:
        word = text.strip().lower()
        word = word[:-1].rstrip() if word.endswith(".") else word
        return word if word in ("yes", "no") else None
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in NEGATIONS for w in words) else "yes"


# --- question and answer files ---------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question_id: int | str
    image: str
    text: str
    label: str  # "yes" | "no"
    line: int


@dataclass(frozen=True)
class QuestionSet:
    """One question file (one split), with what a results file must record about it."""

    name: str  # "coco_llava/random" for shipped files, else the file name's stem
    path: Path
    questions: list[Question]
    sha256: str
    version: str | None  # known provenance when the file is (identical to) a shipped one

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "version": self.version,
            "questions": len(self.questions),
        }


def shipped_path(dataset: str, split: str) -> Path:
    if dataset not in DATASETS:
        raise DataError(f"unknown POPE dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown POPE split {split!r}; choose from {', '.join(SPLITS)}")
    return data_path("pope", DATASETS[dataset].pattern.format(split=split))


@cache
def _shipped_by_hash() -> dict[str, tuple[str, str]]:
    """sha256 -> (name, version) of every shipped question file."""
    out = {}
    for dataset, info in DATASETS.items():
        for split in SPLITS:
            path = shipped_path(dataset, split)
            out[sha256_file(path)] = (f"{dataset}/{split}", info.version)
    return out


def load_questions(spec: str | os.PathLike) -> QuestionSet:
    """Load a question file: a path, or a shipped ``dataset/split`` such as ``coco/random``.

    Every record needs ``question_id``, ``image``, ``text`` and ``label`` ("yes"/"no");
    ``question_id`` must be unique. Errors name the file and line.
    """
    path = Path(spec)
    name = path.stem
    if not path.exists():
        dataset, sep, split = str(spec).partition("/")
        if not sep or dataset not in DATASETS:
            shipped = ", ".join(f"{d}/{{{','.join(SPLITS)}}}" for d in DATASETS)
            raise DataError(f"{spec}: no such question file (shipped: {shipped})")
        path, name = shipped_path(dataset, split), f"{dataset}/{split}"
    questions, seen = [], {}
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        qid = require(rec, "question_id", (int, str), where)
        label = require(rec, "label", str, where)
        if label not in ("yes", "no"):
            raise DataError(f"{where}: label must be 'yes' or 'no', got {label!r}")
        key = str(qid)
        if key in seen:
            raise DataError(f"{where}: question_id {qid!r} already used on line {seen[key]}")
        seen[key] = line
        questions.append(
            Question(
                qid,
                require(rec, "image", str, where),
                require(rec, "text", str, where),
                label,
                line,
            )
        )
    if not questions:
        raise DataError(f"{path}: no questions")
    digest = sha256_file(path)
    known = _shipped_by_hash().get(digest)
    if known and name == path.stem:
        name = known[0]
    return QuestionSet(name, path, questions, digest, known[1] if known else None)


@dataclass(frozen=True)
class Answer:
    line: int
    text: str
    prompt: str | None  # LLaVA's answer files record the question asked


def load_answers(path: str | os.PathLike) -> dict[str, Answer]:
    """``str(question_id) -> Answer`` from an answers file (LLaVA's answer format).

    Each record needs ``question_id`` and ``text``; a question answered twice is an error.
    """
    path = Path(path)
    answers: dict[str, Answer] = {}
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        key = str(require(rec, "question_id", (int, str), where))
        text = require(rec, "text", str, where)
        if key in answers:
            first = answers[key].line
            raise DataError(f"{where}: question_id {key} already answered on line {first}")
        prompt = rec.get("prompt")
        answers[key] = Answer(line, text, prompt if isinstance(prompt, str) else None)
    return answers


def match(
    questions: QuestionSet,
    answers: dict[str, Answer],
    answers_path: str | os.PathLike,
    allow_missing: bool = False,
    allow_extra: bool = False,
    check_prompts: bool = True,
) -> list[str | None]:
    """Answer texts in question order (None: unanswered, only with ``allow_missing``).

    Where an answer records its ``prompt`` (LLaVA's answer files do), the question's text must
    occur in it: both POPE versions number their questions 1, 2, ... with different questions,
    so answers scored against the other version would otherwise go unnoticed.
    """
    keys = [str(q.question_id) for q in questions.questions]
    if check_prompts:
        wrong = [
            q
            for q, k in zip(questions.questions, keys, strict=True)
            if k in answers and answers[k].prompt is not None and q.text not in answers[k].prompt
        ]
        if wrong:
            first = answers[str(wrong[0].question_id)]
            raise DataError(
                f"{answers_path}:{first.line}: {len(wrong)} answers were given to other questions "
                f"than {questions.path} asks (question_id {wrong[0].question_id}: prompt "
                f"{first.prompt!r}, question {wrong[0].text!r}); another version of the file? "
                "(--ignore-prompts skips this check)"
            )
    missing = [
        q.question_id for q, k in zip(questions.questions, keys, strict=True) if k not in answers
    ]
    if missing and not allow_missing:
        raise DataError(
            f"{answers_path}: no answer for {len(missing)} of {len(keys)} questions of "
            f"{questions.path} (question_id {format_ids(missing)}); pass allow_missing / "
            "--allow-missing to score them as unanswered (wrong)"
        )
    extra = sorted(set(answers) - set(keys), key=lambda k: answers[k].line)
    if extra and not allow_extra:
        lines = [f"{k} (line {answers[k].line})" for k in extra]
        raise DataError(
            f"{answers_path}: {len(extra)} answers have a question_id that is not in "
            f"{questions.path}: {format_ids(lines)}"
        )
    return [answers[k].text if k in answers else None for k in keys]


# --- metrics ----------------------------------------------------------------------------------


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


def ratios(predictions: Sequence[str | None], labels: Sequence[str]) -> stats.Ratios:
    """The metrics of :func:`metrics` as per-question numerators/denominators (bootstrap)."""
    p = np.array([x == "yes" for x in predictions], dtype=float)
    y = np.array([x == "yes" for x in labels], dtype=float)
    right = np.array([a == b for a, b in zip(predictions, labels, strict=True)], dtype=float)
    tp, fp, fn = p * y, p * (1 - y), (1 - p) * y
    one = np.ones_like(p)
    return {
        "accuracy": (right, one, 100.0),
        "precision": (tp, tp + fp, 100.0),
        "recall": (tp, tp + fn, 100.0),
        "f1": (2 * tp, 2 * tp + fp + fn, 100.0),
        "yes_ratio": (p, one, 100.0),
    }


def score(
    questions: QuestionSet, texts: Sequence[str | None], strict: bool = False
) -> dict[str, float | int]:
    """Metrics of one split from answer texts in question order (None: unanswered)."""
    preds = [None if t is None else parse_answer(t, strict) for t in texts]
    labels = [q.label for q in questions.questions]
    out: dict = metrics(preds, labels)
    out["n"] = len(labels)
    out["unanswered"] = sum(t is None for t in texts)
    out["unparsed"] = sum(t is not None and p is None for t, p in zip(texts, preds, strict=True))
    out["empty"] = sum(t is not None and not t.strip() for t in texts)
    return out


def mean_f1(per_split: dict[str, dict]) -> float:
    """The F1 averaged over splits (LLaVA's POPE number when the splits are COCO's three)."""
    return float(np.mean([m["f1"] for m in per_split.values()]))


def compare(
    answers_a: Sequence[str | None],
    answers_b: Sequence[str | None],
    labels: Sequence[str],
    n_boot: int = stats.DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """Both arms' metrics, B - A with paired bootstrap 95% intervals, McNemar's exact p.

    Answers are parsed predictions ("yes"/"no"/None) of the same questions in the same order.
    """
    result = stats.paired_comparison(
        ratios(answers_a, labels), ratios(answers_b, labels), n_boot, seed
    )
    right_a = [p == y for p, y in zip(answers_a, labels, strict=True)]
    right_b = [p == y for p, y in zip(answers_b, labels, strict=True)]
    pairs = stats.discordant(right_a, right_b)
    result["mcnemar_p"] = stats.mcnemar_p(pairs)
    result["discordant"] = pairs
    result["flips"] = sum(x != y for x, y in zip(answers_a, answers_b, strict=True))
    result["n"] = len(labels)
    return result


def compare_splits(
    labels: dict[str, Sequence[str]],
    preds_a: dict[str, Sequence[str | None]],
    preds_b: dict[str, Sequence[str | None]],
    n_boot: int = stats.DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """:func:`compare` per split plus the mean F1 of both arms with a stratified interval.

    Each split is resampled within itself (its own seed stream), and the mean-F1 replicate is
    the mean of the splits' F1 replicates.
    """
    seeds = np.random.SeedSequence(seed).spawn(len(labels))
    splits, reps = {}, []
    for (name, y), ss in zip(labels.items(), seeds, strict=True):
        split_seed = int(ss.generate_state(1)[0])
        splits[name] = compare(preds_a[name], preds_b[name], y, n_boot, split_seed)
        ra, rb = ratios(preds_a[name], y), ratios(preds_b[name], y)
        reps.append(stats.replicates([{"f1": ra["f1"]}, {"f1": rb["f1"]}], n_boot, split_seed))
    f1_a = np.mean([r[0]["f1"] for r in reps], axis=0)
    f1_b = np.mean([r[1]["f1"] for r in reps], axis=0)
    a = float(np.mean([s["a"]["f1"] for s in splits.values()]))
    b = float(np.mean([s["b"]["f1"] for s in splits.values()]))
    return {
        "splits": splits,
        "mean_f1": {
            "a": a,
            "b": b,
            "delta": b - a,
            "ci_a": stats.interval(f1_a),
            "ci_b": stats.interval(f1_b),
            "ci_delta": stats.interval(f1_b - f1_a),
            "splits": list(labels),
        },
    }


def shipped_names(filename: str) -> list[str]:
    """The shipped ``dataset/split`` names whose file is called ``filename``."""
    return [f"{d}/{s}" for d in DATASETS for s in SPLITS if shipped_path(d, s).name == filename]


def _resolve(
    spec: str | os.PathLike,
    answers: dict[str, Answer],
    answers_path: str | os.PathLike,
    check_prompts: bool,
    allow_extra: bool,
) -> QuestionSet:
    """Load a question file; a bare shipped file name that is no file here (e.g.
    ``coco_pope_random.json``, which both COCO versions have) means the shipped file of that
    name that the answers fit: every question answered and, where recorded, the same prompts."""
    name = str(spec)
    candidates = shipped_names(name)
    if Path(spec).exists() or Path(name).name != name or not candidates:
        return load_questions(spec)
    fitting = []
    for qs in map(load_questions, candidates):
        try:
            match(qs, answers, answers_path, False, allow_extra, check_prompts)
        except DataError:
            continue
        fitting.append(qs)
    if len(fitting) == 1:
        return fitting[0]
    which = "both" if fitting else "neither"
    raise DataError(
        f"{name}: no such file here; shipped files of that name are {' and '.join(candidates)} "
        f"and the answers fit {which}: give one of those names (or a path)"
    )


def score_files(
    question_specs: Sequence[str | os.PathLike],
    answer_paths: Sequence[str | os.PathLike],
    strict: bool = False,
    allow_missing: bool = False,
    check_prompts: bool = True,
) -> dict:
    """Score answers files against question files (``vlsae-guard score pope``).

    One answers file per question file, or a single answers file for several question files
    when their question ids do not collide (each answer then goes to the file that asks it).
    With one question file the metrics are top-level keys; with several they are under
    ``splits`` and ``mean_f1`` is added.
    """
    if len(answer_paths) not in (1, len(question_specs)):
        raise DataError(
            f"give one answers file, or one per question file ({len(question_specs)}); "
            f"got {len(answer_paths)}"
        )
    loaded = {str(p): load_answers(p) for p in answer_paths}
    paired = len(answer_paths) == len(question_specs)
    answer_for = [answer_paths[k if paired else 0] for k in range(len(question_specs))]
    sets = [
        _resolve(spec, loaded[str(path)], path, check_prompts, allow_extra=not paired)
        for spec, path in zip(question_specs, answer_for, strict=True)
    ]
    per_split, texts_by_split = {}, {}
    if not paired:
        owners: dict[str, str] = {}
        for qs in sets:
            for q in qs.questions:
                key = str(q.question_id)
                if key in owners:
                    raise DataError(
                        f"question_id {key} is in both {owners[key]} and {qs.path}: give one "
                        "answers file per question file"
                    )
                owners[key] = str(qs.path)
        extra = [k for k in loaded[str(answer_paths[0])] if k not in owners]
        if extra:
            raise DataError(
                f"{answer_paths[0]}: {len(extra)} answers have a question_id that is in none of "
                f"the question files: {format_ids(extra)}"
            )
    for qs, path in zip(sets, answer_for, strict=True):
        texts_by_split[qs.name] = match(
            qs, loaded[str(path)], path, allow_missing, not paired, check_prompts
        )
    for qs in sets:
        per_split[qs.name] = score(qs, texts_by_split[qs.name], strict)
    out: dict = {}
    if len(sets) == 1:
        out.update(per_split[sets[0].name])
    else:
        out["splits"] = per_split
        out["mean_f1"] = mean_f1(per_split)
    out["parser"] = PARSERS[strict]
    out["questions"] = [qs.describe() for qs in sets]
    out["answers"] = [str(p) for p in answer_paths]
    return out
