"""lmms-eval's POPE task on a local copy of the questions and images (offline, no Hub).

lmms-eval's ``pope`` task reads ``lmms-lab-encoder/POPE`` from the Hub; offline, or on POPE
files of one's own (the package's shipped ones, the lab's), :func:`write_pope_task` writes the
questions and images as a parquet file in that dataset's columns (``question_id``,
``question``, ``answer``, ``image_source``, ``image``, ``category``) and a task file that
includes lmms-eval's own ``pope.yaml`` (its prompt, parser and metrics unchanged) with the
dataset pointed at the copy: ``--tasks NAME --include_path DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..scoring.pope import load_questions


def write_pope_task(
    questions: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
    name: str = "pope_local",
) -> Path:  # fmt: skip
    """Write ``OUT/NAME.parquet`` and ``OUT/NAME.yaml`` from a POPE question file (our format:
    question_id, image, text, label) and its image folder; returns the task file."""
    import datasets
    import lmms_eval

    qs = load_questions(questions)
    root, out = Path(images), Path(out)
    missing = [q.image for q in qs.questions if not (root / q.image).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} images of {qs.path} missing: {missing[:3]}"
        )
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image_source": datasets.Value("string"),
            "image": datasets.Image(),
            "category": datasets.Value("string"),
        }
    )
    rows = {
        "question_id": [str(q.question_id) for q in qs.questions],
        "question": [q.text for q in qs.questions],
        "answer": [q.label for q in qs.questions],
        "image_source": [q.image for q in qs.questions],
        "image": [{"bytes": (root / q.image).read_bytes(), "path": q.image} for q in qs.questions],
        "category": [qs.name] * len(qs.questions),
    }
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(data)
    pope = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    task = out / f"{name}.yaml"
    task.write_text(
        f"include: {pope}\n"
        f"task: {name}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
    )
    return task
