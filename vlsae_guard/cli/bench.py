"""Benchmark commands: ``demo`` (the A/B harness on a lab LLaVA trained here) and
``score pope|chair`` (files that others produced)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.intervention import GuardConfig
from ..lab.demo import DemoConfig
from ..outputs import write_text
from .app import arg, field_arg, rewrite_args, rewrite_flag, subcommand, validated, write_json


@subcommand(
    "demo",
    "A/B POPE run of the guard on a lab LLaVA trained here (offline, ~80 s on a CPU; cached)",
    field_arg(DemoConfig, "n_images", "--images", type=int, fill=True, help="test images"),
    field_arg(DemoConfig, "seed", "--seed", type=int, fill=True),
    arg("--alpha", type=float, help="guard strength in [0, 1] (default: 0.5, the guard's)"),
    *rewrite_args(),
    field_arg(DemoConfig, "batch_size", "--batch-size", type=int, fill=True),
    field_arg(DemoConfig, "out", "--out", type=Path, fill=True, help="output directory"),
)
def demo_command(args: argparse.Namespace) -> None:
    """Same as ``python benchmarks/pope.py --demo``: train (or load) a lab LLaVA with its planted
    hallucination and its VL-SAE; run the A/B harness on the lab's test questions; print each
    cause's hallucination, both arms, deltas and McNemar's p."""
    from ..lab.demo import run_demo

    guard = validated(GuardConfig, "guard settings", alpha=args.alpha, rewrite=rewrite_flag(args))
    config = validated(
        DemoConfig,
        "arguments",
        out=args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        n_images=args.images,
        guard=guard,
    )
    print(run_demo(config)[1])


@subcommand(
    "score pope",
    "score POPE answers (LLaVA's answer format) against question files",
    arg(
        "--questions",
        nargs="+",
        required=True,
        metavar="FILE",
        help="question files (JSON lines or array), or shipped names such as coco/random, "
        "coco_llava/adversarial, aokvqa/popular, gqa/random",
    ),
    arg(
        "--answers",
        nargs="+",
        required=True,
        metavar="FILE",
        help="answers (JSON lines with question_id and text): one file, or one per question file",
    ),
    arg("--strict", action="store_true", help="exact yes/no parser instead of LLaVA's"),
    arg(
        "--allow-missing",
        action="store_true",
        help="score questions without an answer as unanswered (wrong) instead of failing",
    ),
    arg(
        "--ignore-prompts",
        action="store_true",
        help="do not check that each answer's recorded prompt contains its question",
    ),
    arg("--out", type=Path, metavar="results.json", help="write the metrics as JSON"),
)
def score_pope_command(args: argparse.Namespace) -> None:
    """POPE metrics exactly as LLaVA's eval_pope.py computes them, in percent: accuracy,
    precision, recall, F1 (positive class yes), yes_ratio; with several question files also the
    mean F1 over them (LLaVA's reported number)."""
    from ..scoring import pope, report

    result = pope.score_files(
        args.questions, args.answers, args.strict, args.allow_missing, not args.ignore_prompts
    )
    splits = result.get("splits") or {result["questions"][0]["name"]: result}
    rows = [
        report.Row(name, m, {"answers": v[m]}, {})
        for name, v in splits.items()
        for m in pope.METRICS
    ]
    if "mean_f1" in result:
        rows.append(report.Row("mean over splits", "f1", {"answers": result["mean_f1"]}, {}))
    print(report.text_table(rows))
    unanswered = sum(v["unanswered"] for v in splits.values())
    print(f"\nparser: {result['parser']}" + (f"; {unanswered} unanswered" if unanswered else ""))
    empty = sum(v["empty"] for v in splits.values())
    if empty:
        print(
            f"WARNING: {empty} answers are empty: {pope.EMPTY_MEANS[args.strict]}", file=sys.stderr
        )
    write_json(args.out, result)


@subcommand(
    "score chair",
    "score CHAIR on image descriptions (COCO 2014 images)",
    arg(
        "--captions",
        required=True,
        type=Path,
        metavar="FILE",
        help="JSON lines (or array) with image_id and caption",
    ),
    arg(
        "--coco-annotations",
        type=Path,
        metavar="DIR",
        help="COCO 2014 annotation directory (instances_/captions_val2014.json, train2014 "
        "too if present) to build the ground truth from (cached); default: the shipped table",
    ),
    arg("--image-id-key", default="image_id"),
    arg("--caption-key", default="caption"),
    arg(
        "--details",
        type=Path,
        metavar="FILE.jsonl",
        help="also write every caption's mentions, hallucinations and ground truth",
    ),
    arg("--out", type=Path, metavar="results.json", help="write the metrics as JSON"),
)
def score_chair_command(args: argparse.Namespace) -> None:
    """CHAIR as the standard chair.py computes it: CHAIR_s, CHAIR_i, Recall in percent and Len
    (tokens per caption)."""
    from ..scoring import chair, report

    result, scores = chair.score_file(
        args.captions, args.coco_annotations, args.image_id_key, args.caption_key
    )
    rows = [report.Row("", m, {"captions": result[m]}, {}) for m in chair.METRICS]
    print(report.text_table(rows))
    print(
        f"\n{result['n']} captions of {result['images']} images; ground truth: "
        f"{result['ground_truth']['kind']} ({result['ground_truth']['path']})"
    )
    if args.details:
        write_text(args.details, "".join(json.dumps(s.to_json()) + "\n" for s in scores))
    write_json(args.out, result)
