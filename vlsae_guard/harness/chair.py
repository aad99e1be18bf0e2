"""The CHAIR A/B run behind ``benchmarks/chair.py``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import outputs
from ..scoring import chair, report
from ..scoring.files import DataError
from . import common
from .common import Item, Job
from .config import ChairRunConfig


def image_ids(config: ChairRunConfig) -> tuple[str, list[int]]:
    if config.image_ids:
        text = config.image_ids.read_text().split()
        ids = [chair.image_id(t, f"{config.image_ids}") for t in text]
        name = config.image_ids.stem
    else:
        ids, name = chair.chair500_ids(), config.split
    if len(set(ids)) != len(ids):
        raise DataError(f"{name}: image ids repeat")
    return name, ids[: config.limit] if config.limit else ids


def image_file(directory: Path, image: int) -> Path:
    """COCO val2014's file name; a train2014 name is tried when only that one exists."""
    val = directory / f"COCO_val2014_{image:012d}.jpg"
    train = directory / f"COCO_train2014_{image:012d}.jpg"
    return train if not val.exists() and train.exists() else val


def run(config: ChairRunConfig, progress: bool = True) -> dict:
    """Generate the missing captions and score both arms; returns the results dict
    (:func:`finish` writes it)."""
    outputs.check_writable(config.out)  # before hashing and loading: a late failure loses a batch
    common.check_layout(config.out)
    arms = config.arms
    name, ids = image_ids(config)
    gt = chair.ground_truth(config.coco_annotations)
    gt.check(ids)  # before any generation: unknown ids would all count as hallucinations
    setup = common.setup(config)
    jobs = []
    for arm in arms:
        settings = setup.answer_settings(config, arm, {"prompt": config.prompt})
        log_path = common.answers_dir(config.out, arm) / f"{common.safe_name(name)}.jsonl"
        log = common.AnswerLog(log_path, "image_id", settings)
        items = [
            Item(str(i), image_file(config.images or Path(), i), config.prompt, {"image_id": i})
            for i in ids
        ]
        jobs.append(Job(arm, name, items, log))
    if any(job.pending() for job in jobs) and config.images is None:
        raise common.BenchmarkError("--images DIR is required (COCO val2014 images)")
    common.check_images(jobs, config.out)
    started = time.perf_counter()
    arm_seconds = common.generate(config, setup, jobs, "caption", progress)
    seconds = time.perf_counter() - started

    scores, empty = {}, {}
    for job in jobs:
        captions = [(int(it.key), job.log.records[it.key]["caption"]) for it in job.items]
        scores[job.arm] = chair.score_captions(captions, gt)
        empty[job.arm] = sum(not caption.strip() for _, caption in captions)
        details = config.out / f"chair_details_{job.arm}.jsonl"
        outputs.write_text(
            details, "".join(json.dumps(s.to_json()) + "\n" for s in scores[job.arm])
        )
    results: dict = {"benchmark": "chair", "arms": list(arms), "images": len(ids)}
    for arm in arms:
        results[arm] = {**chair.metrics(scores[arm]), "empty": empty[arm]}
    results["warnings"] = common.empty_warnings(
        {arm: empty[arm] for arm in arms},
        "captions",
        "an empty caption mentions no object, so it lowers CHAIR without describing the image",
    )
    results["warnings"] += common.fit_warnings(common.recorded_fit(config.out))
    if len(arms) == 2:
        results["comparison"] = chair.compare(
            *(scores[a] for a in arms), config.bootstrap, config.seed
        )
    results["settings"] = common.settings_record(
        config,
        setup,
        {
            "split": name,
            "prompt": config.prompt,
            "ground_truth": gt.source,
            "scorer": chair.SCORER_VERSION,
            "bootstrap": {"replicates": config.bootstrap, "seed": config.seed, "level": 0.95},
            "generation_seconds": round(seconds, 1),
            "arm_seconds": arm_seconds,  # per arm generated in this process (cost ratios)
        },
    )
    return results


def rows(results: dict) -> list[report.Row]:
    arms = results["arms"]
    return report.rows_from_comparison(
        "", {a: results[a] for a in arms}, results.get("comparison"), chair.METRICS
    )


NOTES = (
    "CHAIR_s, CHAIR_i and Recall in percent, Len in tokens (lower CHAIR is better). delta = "
    "B - A (the second method minus the first) with a paired bootstrap 95% interval (images "
    "resampled). CHAIR "
    "depends strongly on max_new_tokens and decoding: compare only runs with the same settings."
)


def finish(results: dict, out: Path) -> str:
    notes = [NOTES, *(f"WARNING: {w}" for w in results["warnings"])]
    title = "CHAIR: " + " vs ".join(results["arms"])
    return common.write_outputs(out, results, rows(results), title, notes)
