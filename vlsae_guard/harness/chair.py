"""The CHAIR A/B run behind ``benchmarks/chair.py``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import outputs
from ..scoring import chair, report
from ..scoring.files import DataError
from . import common
from .common import Item, Job

SPLITS = ("chair500",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/chair.py",
        description="CHAIR on a LLaVA model with and without the VL-SAE guard (A/B).",
    )
    common.add_common_args(p, max_new_tokens=512)
    g = p.add_argument_group("CHAIR")
    g.add_argument(
        "--split",
        choices=SPLITS,
        default="chair500",
        help="chair500: the 500 COCO val2014 images of the standard LLaVA protocol",
    )
    g.add_argument(
        "--image-ids",
        type=Path,
        metavar="FILE",
        help="COCO image ids, one per line, instead of --split",
    )
    g.add_argument("--prompt", default=chair.PROMPT, help=f"default: {chair.PROMPT!r}")
    g.add_argument(
        "--coco-annotations",
        type=Path,
        metavar="DIR",
        help="build the ground truth from the COCO 2014 annotation files "
        "(cached) instead of the shipped table",
    )
    return p


def image_ids(args: argparse.Namespace) -> tuple[str, list[int]]:
    if args.image_ids:
        text = args.image_ids.read_text().split()
        ids = [chair.image_id(t, f"{args.image_ids}") for t in text]
        name = args.image_ids.stem
    else:
        ids, name = chair.chair500_ids(), args.split
    if len(set(ids)) != len(ids):
        raise DataError(f"{name}: image ids repeat")
    return name, ids[: args.limit] if args.limit else ids


def image_file(directory: Path, image: int) -> Path:
    """COCO val2014's file name; a train2014 name is tried when only that one exists."""
    val = directory / f"COCO_val2014_{image:012d}.jpg"
    train = directory / f"COCO_train2014_{image:012d}.jpg"
    return train if not val.exists() and train.exists() else val


def run(args: argparse.Namespace, progress: bool = True) -> dict:
    common.check_args(args)
    arms = common.arms(args)
    name, ids = image_ids(args)
    gt = chair.ground_truth(args.coco_annotations)
    gt.check(ids)  # before any generation: unknown ids would all count as hallucinations
    setup = common.setup(args)
    jobs = []
    for arm in arms:
        settings = setup.answer_settings(args, arm, {"prompt": args.prompt})
        log_path = common.answers_dir(args.out, arm) / f"{common.safe_name(name)}.jsonl"
        log = common.AnswerLog(log_path, "image_id", settings)
        items = [
            Item(str(i), image_file(args.images or Path(), i), args.prompt, {"image_id": i})
            for i in ids
        ]
        jobs.append(Job(arm, name, items, log))
    if any(job.pending() for job in jobs) and args.images is None:
        raise common.BenchmarkError("--images DIR is required (COCO val2014 images)")
    common.check_images(jobs, args.out)
    started = time.perf_counter()
    common.generate(args, setup, jobs, "caption", progress)
    seconds = time.perf_counter() - started

    scores, empty = {}, {}
    for job in jobs:
        captions = [(int(it.key), job.log.records[it.key]["caption"]) for it in job.items]
        scores[job.arm] = chair.score_captions(captions, gt)
        empty[job.arm] = sum(not caption.strip() for _, caption in captions)
        details = args.out / f"chair_details_guard-{job.arm}.jsonl"
        outputs.write_text(
            details, "".join(json.dumps(s.to_json()) + "\n" for s in scores[job.arm])
        )
    results: dict = {"benchmark": "chair", "arms": list(arms), "images": len(ids)}
    for arm in arms:
        results[arm] = {**chair.metrics(scores[arm]), "empty": empty[arm]}
    results["warnings"] = common.empty_warnings(
        {f"guard {arm}": empty[arm] for arm in arms},
        "captions",
        "an empty caption mentions no object, so it lowers CHAIR without describing the image",
    )
    if len(arms) == 2:
        results["comparison"] = chair.compare(
            scores["off"], scores["on"], args.bootstrap, args.seed
        )
    results["settings"] = common.settings_record(
        args,
        setup,
        {
            "split": name,
            "prompt": args.prompt,
            "ground_truth": gt.source,
            "scorer": chair.SCORER_VERSION,
            "bootstrap": {"replicates": args.bootstrap, "seed": args.seed, "level": 0.95},
            "generation_seconds": round(seconds, 1),
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
    "guard on - guard off with a paired bootstrap 95% interval (images resampled). CHAIR "
    "depends strongly on max_new_tokens and decoding: compare only runs with the same settings."
)


def finish(results: dict, out: Path) -> str:
    notes = [NOTES, *(f"WARNING: {w}" for w in results["warnings"])]
    return common.write_outputs(out, results, rows(results), "CHAIR: guard off vs on", notes)
