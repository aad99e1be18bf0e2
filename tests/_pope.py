"""What the POPE runner tests share (hf/llava in the fast suite, vllm/openai in the vLLM one):
images with questions about them, a run of the real runner (through benchmarks/pope.py's flags,
or from a typed config), and its answer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlsae_guard import VLSAE, SAEConfig
from vlsae_guard.cli import bench_flags
from vlsae_guard.harness import pope as harness
from vlsae_guard.harness.config import PopeRunConfig

SHAPES = ["dog", "circle", "square"]


def write_inputs(root: Path, images, n_questions: int = 8) -> Path:
    """``root/images/img{i}.png`` and ``root/questions.jsonl``: yes/no alternating, cycling
    over the images and three objects."""
    (root / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(root / "images" / f"img{i}.png")
    with open(root / "questions.jsonl", "w") as f:
        for n in range(n_questions):
            label = "yes" if n % 2 else "no"
            q = {"question_id": n + 1, "image": f"img{n % len(images)}.png", "label": label}
            q["text"] = f"Is there a {SHAPES[n % 3]} in the image?"
            f.write(json.dumps(q) + "\n")
    return root


def write_sae(
    root: Path, n_concepts: int = 256, k: int = 16, every: int = 3, d_in: int = 64
) -> Path:
    """``root/sae``: a random VL-SAE for the tiny models (every ``every``-th concept shared)."""
    torch.manual_seed(0)
    shared = list(range(0, n_concepts, every))
    config = SAEConfig(d_in=d_in, n_concepts=n_concepts, k=k, shared_concepts=shared)
    VLSAE(config).eval().save_pretrained(root / "sae")
    return root / "sae"


def run(inputs, model, out, *extra, backend="hf", device="cpu"):
    """benchmarks/pope.py's run on ``inputs``: 4 new tokens, fp32, unless ``extra`` says."""
    argv = [
        "--model", str(model), "--backend", backend, "--images", str(inputs / "images"),
        "--questions", str(inputs / "questions.jsonl"), "--out", str(out),
        "--max-new-tokens", "4", "--dtype", "float32", "--bootstrap", "200",
        *(["--device", device] if device else []), *extra,
    ]  # fmt: skip
    config = bench_flags.pope_config(bench_flags.pope_parser().parse_args(argv))
    return harness.run(config, progress=False)


def run_config(inputs, model, out, **fields):
    """The same run as :func:`run` from a :class:`PopeRunConfig`, without any flags."""
    config = PopeRunConfig(
        model=model, images=inputs / "images", questions=[inputs / "questions.jsonl"], out=out,
        max_new_tokens=4, dtype="float32", bootstrap=200, device="cpu", **fields,
    )  # fmt: skip
    return harness.run(config, progress=False)


def answers(out, arm):
    path = out / "answers" / f"{arm}" / "questions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def texts(out, arm):
    return {r["question_id"]: r["text"] for r in answers(out, arm)}
