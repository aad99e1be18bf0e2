"""The POPE A/B run behind ``benchmarks/pope.py`` (and its ``--demo``)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .. import outputs
from ..scoring import pope, report
from ..scoring.files import DataError
from . import common
from .common import Item, Job
from .config import PopeRunConfig


def question_sets(run: PopeRunConfig) -> list[pope.QuestionSet]:
    specs = run.questions or [
        f"{run.dataset}/{s}" for s in (pope.SPLITS if run.split == "all" else [run.split])
    ]
    sets = [pope.load_questions(spec) for spec in specs]
    if run.limit:
        sets = [dataclasses.replace(qs, questions=qs.questions[: run.limit]) for qs in sets]
    names = [qs.name for qs in sets]
    if len(set(names)) != len(names):
        raise DataError(f"question files must have distinct names, got {names}")
    return sets


def run(config: PopeRunConfig, progress: bool = True) -> dict:
    """Generate what is missing and score both arms; returns the results dict (:func:`finish`
    writes it)."""
    outputs.check_writable(config.out)  # before hashing and loading: a late failure loses a batch
    common.check_layout(config.out)
    arms = config.arms
    sets = question_sets(config)
    setup = common.setup(config)
    template = pope.PROMPTS[config.prompt]
    jobs = []
    for arm in arms:
        for qs in sets:
            settings = setup.answer_settings(
                config, arm, {"prompt": template, "questions_sha256": qs.sha256}
            )
            log_path = common.answers_dir(config.out, arm) / f"{common.safe_name(qs.name)}.jsonl"
            log = common.AnswerLog(log_path, "question_id", settings)
            items = [
                Item(
                    key=str(q.question_id),
                    image=(config.images or Path()) / q.image,
                    prompt=pope.build_prompt(q.text, config.prompt),
                    record={"question_id": q.question_id, "image": q.image},
                )
                for q in qs.questions
            ]
            jobs.append(Job(arm, qs.name, items, log))
    if any(job.pending() for job in jobs) and config.images is None:
        raise common.BenchmarkError("--images DIR is required (the question files' images)")
    common.check_images(jobs, config.out)
    started = time.perf_counter()
    arm_seconds = common.generate(config, setup, jobs, "text", progress)
    return score(config, setup, sets, jobs, arms, time.perf_counter() - started, arm_seconds)


def score(
    config: PopeRunConfig, setup, sets, jobs, arms, seconds: float, arm_seconds: dict | None = None
) -> dict:
    strict = config.strict
    texts = {
        (job.arm, job.split): [job.log.records[it.key]["text"] for it in job.items] for job in jobs
    }
    splits: dict[str, dict] = {}
    for qs in sets:
        splits[qs.name] = {"questions": qs.describe()}
        for arm in arms:
            splits[qs.name][arm] = pope.score(qs, texts[arm, qs.name], strict)
    results: dict = {"benchmark": "pope", "arms": list(arms)}
    mean = {"splits": [qs.name for qs in sets]}
    mean.update({arm: pope.mean_f1({n: s[arm] for n, s in splits.items()}) for arm in arms})
    if len(arms) == 2:
        a, b = arms
        preds = {
            arm: {
                qs.name: [pope.parse_answer(t, strict) for t in texts[arm, qs.name]] for qs in sets
            }
            for arm in arms
        }
        labels = {qs.name: [q.label for q in qs.questions] for qs in sets}
        both = pope.compare_splits(labels, preds[a], preds[b], config.bootstrap, config.seed)
        for qs in sets:  # the per-question paired outcomes McNemar's test is computed on
            paired = config.out / "paired" / f"{common.safe_name(qs.name)}.jsonl"
            with outputs.replacing(paired) as f:
                for i, q in enumerate(qs.questions):
                    record = {"question_id": q.question_id, "image": q.image, "label": q.label}
                    for arm in arms:
                        pred = preds[arm][qs.name][i]
                        record[arm] = texts[arm, qs.name][i]
                        record.update({f"pred_{arm}": pred, f"correct_{arm}": pred == q.label})
                    f.write(json.dumps(record) + "\n")
        for name, comparison in both["splits"].items():
            splits[name]["comparison"] = comparison
        mean["comparison"] = both["mean_f1"]
    results["splits"] = splits
    results["mean_f1"] = mean
    empty = {f"{name}, {arm}": splits[name][arm]["empty"] for name in splits for arm in arms}
    results["warnings"] = common.empty_warnings(empty, "answers", pope.EMPTY_MEANS[strict])
    results["warnings"] += common.fit_warnings(common.recorded_fit(config.out))
    results["settings"] = common.settings_record(
        config,
        setup,
        {
            "prompt": {"style": config.prompt, "template": pope.PROMPTS[config.prompt]},
            "parser": pope.PARSERS[strict],
            "questions": [qs.describe() for qs in sets],
            "bootstrap": {"replicates": config.bootstrap, "seed": config.seed, "level": 0.95},
            "generation_seconds": round(seconds, 1),
            "arm_seconds": arm_seconds or {},  # per arm generated in this process (cost ratios)
        },
    )
    return results


def rows(results: dict) -> list[report.Row]:
    arms = results["arms"]
    out = []
    for name, split in results["splits"].items():
        comparison = split.get("comparison")
        p = comparison["mcnemar_p"] if comparison else None
        out += report.rows_from_comparison(
            name, {a: split[a] for a in arms}, comparison, pope.METRICS, p
        )
    mean = results["mean_f1"]
    if len(mean["splits"]) > 1:
        comparison = mean.get("comparison")
        out += report.rows_from_comparison(
            "mean over splits",
            {a: {"f1": mean[a]} for a in arms},
            _as_metric(comparison, "f1") if comparison else None,
            ["f1"],
        )
    return out


def _as_metric(comparison: dict, metric: str) -> dict:
    """The mean-F1 comparison in the shape :func:`report.rows_from_comparison` reads."""
    return {k: {metric: comparison[k]} for k in ("delta", "ci_a", "ci_b", "ci_delta")}


NOTES = (
    "Metrics in percent, positive class 'yes'. delta = B - A (the second method minus the "
    "first) with a paired bootstrap 95% interval (questions resampled); McNemar p: exact "
    "two-sided test on the per-question correctness, per split. The mean over splits is the F1 "
    "LLaVA reports."
)


def finish(results: dict, out: Path, title: str, extra_notes=()) -> str:
    notes = [NOTES, *extra_notes, *(f"WARNING: {w}" for w in results["warnings"])]
    table = common.write_outputs(out, results, rows(results), title, notes)
    return table
