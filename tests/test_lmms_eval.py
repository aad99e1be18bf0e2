"""lmms-eval's POPE task, offline, on a lab model through ``vlsae_llava`` (in .venv-lmms).

The model answers through the project's generator, so its answers equal ``benchmarks/pope.py``'s
for the same settings; our scorer on lmms-eval's answers gives lmms-eval's accuracy and F1, and
the yes-ratio of the predictions, where lmms-eval's is that of the labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlsae_guard import VLSAE, SAEConfig, Source, provenance
from vlsae_guard.scoring import pope

pytestmark = pytest.mark.lmms
pytest.importorskip("lmms_eval")

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 16
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The fast lab model, its first test questions and images, an SAE for its projector, and
    lmms-eval's POPE task on a local copy of those questions."""
    from vlsae_guard.lab.testbed.experiment import ExperimentConfig
    from vlsae_guard.lab.testbed.model import trained_model
    from vlsae_guard.lab.testbed.world import build_world
    from vlsae_guard.lmms_eval.pope_task import write_pope_task

    root = tmp_path_factory.mktemp("lmms")
    config = ExperimentConfig.fast()
    world = build_world(config.world, 0)
    model = trained_model(
        world, config.model, config.training, root / "cache", print, config.recipe
    )
    paths = world.write("test", root / "world")
    questions = root / "questions.jsonl"
    questions.write_text("\n".join(paths["random"].read_text().splitlines()[:QUESTIONS]) + "\n")
    torch.manual_seed(0)
    width = config.model.text_hidden
    sae = VLSAE(SAEConfig(d_in=width, n_concepts=4 * width, k=8, source=Source(site="projector"),
                          shared_concepts=list(range(0, 4 * width, 2))))  # fmt: skip
    sae.save_pretrained(root / "sae")
    task = write_pope_task(questions, paths["images"], root / "tasks")
    return {"root": root, "model": model.path, "questions": questions, "images": paths["images"],
            "sae": root / "sae", "task": task}  # fmt: skip


def lmms_run(lab, name: str, model_args: str) -> list[dict]:
    """``python -m vlsae_guard.lmms_eval`` on the local POPE task; its logged samples."""
    out = lab["root"] / f"lmms-{name}"
    args = f"pretrained={lab['model']},prompt_format=chat-template,dtype=float32,{model_args}"
    command = [sys.executable, "-m", "vlsae_guard.lmms_eval", "--model", "vlsae_llava",
               "--model_args", args.rstrip(","), "--tasks", "pope_local", "--include_path",
               str(lab["task"].parent), "--device", "cpu", "--batch_size", "4",
               "--output_path", str(out), "--log_samples"]  # fmt: skip
    done = subprocess.run(command, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (samples,) = out.glob("*/*_samples_pope_local.jsonl")
    (results,) = out.glob("*/*_results.json")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    (recorded,) = json.loads((out / "vlsae_llava.json").read_text())  # what decided the answers
    assert recorded["model_sha256"] == provenance.sha256_dir(lab["model"])
    assert recorded["method"] == ("vlsae" if "sae=" in model_args else "none")
    return sorted(rows, key=lambda r: r["doc_id"]), json.loads(results.read_text())


@pytest.fixture(scope="module")
def pope_answers(lab):
    """``benchmarks/pope.py --ab --method vlsae``'s answers per arm, by question id."""
    out = lab["root"] / "pope"
    command = [sys.executable, str(ROOT / "benchmarks/pope.py"), "--questions",
               str(lab["questions"]), "--images", str(lab["images"]), "--model", str(lab["model"]),
               "--prompt-format", "chat-template", "--dtype", "float32", "--device", "cpu",
               "--max-new-tokens", "128", "--batch-size", "4", "--method", "vlsae", "--ab",
               "--sae", str(lab["sae"]), "--vlsae-alpha", "1.0", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    arms = {}
    for arm in ("none", "vlsae"):
        (file,) = (out / "answers" / arm).glob("*.jsonl")
        arms[arm] = {
            str(r["question_id"]): r["text"] for r in map(json.loads, file.read_text().splitlines())
        }
    return arms


@pytest.mark.parametrize(
    "arm, model_args", [("none", ""), ("vlsae", "method=vlsae,sae={sae},alpha=1.0")]
)
def test_answers_equal_benchmarks_pope_and_our_scorer_equals_lmms_eval(
    lab, pope_answers, arm, model_args
):
    samples, results = lmms_run(lab, arm, model_args.format(sae=lab["sae"]))
    ids = [s["pope_accuracy"]["question_id"] for s in samples]
    answers = [s["filtered_resps"] for s in samples]
    assert answers == [pope_answers[arm][i] for i in ids]
    questions = pope.load_questions(lab["questions"])
    by_id = {str(q.question_id): q for q in questions.questions}
    labels = [by_id[i].label for i in ids]
    ours = pope.metrics([pope.parse_answer(a) for a in answers], labels)
    theirs = results["results"]["pope_local"]
    assert ours["accuracy"] / 100 == pytest.approx(theirs["pope_accuracy,none"])
    assert ours["f1"] / 100 == pytest.approx(theirs["pope_f1_score,none"])
    # lmms-eval's yes-ratio counts the labels (half of POPE's are "yes"), ours the answers
    assert theirs["pope_yes_ratio,none"] == pytest.approx(labels.count("yes") / len(labels))
    said_yes = sum(a.strip().lower() == "yes" for a in answers) / len(answers)
    assert ours["yes_ratio"] / 100 == pytest.approx(said_yes)


def test_the_two_pitfalls_of_lmms_evals_pope_scoring():
    """lmms-eval's exact match scores "Yes." as neither answer; its yes-ratio reads labels."""
    from lmms_eval.tasks.pope import utils

    labels = ["yes", "yes", "no", "no"]
    docs = [{"question_id": str(i), "answer": y} for i, y in enumerate(labels)]
    answers = ["Yes.", "yes", "No", "Yes"]
    scored = [
        utils.pope_process_results(d, [a])["pope_accuracy"]
        for d, a in zip(docs, answers, strict=True)
    ]
    assert utils.pope_aggregate_accuracy(scored) == 0.5  # "Yes." counted wrong
    assert utils.pope_aggregate_yes_ratio(scored) == 0.5  # the labels' share, not the answers'
    ours = pope.metrics([pope.parse_answer(a) for a in answers], labels)
    assert ours["accuracy"] == 75.0 and ours["yes_ratio"] == 75.0


def test_the_launcher_refuses_bad_model_args_before_loading(lab):
    command = [sys.executable, "-m", "vlsae_guard.lmms_eval", "--model", "vlsae_llava",
               "--model_args", f"pretrained={lab['model']},method=vlsae", "--tasks",
               "pope_local", "--include_path", str(lab["task"].parent),
               "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert "method 'vlsae' needs sae=DIR" in done.stdout + done.stderr
