"""The README's demo: runs end to end through the real harness and its files agree."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from vlsae_guard import VLSAE, GuardConfig
from vlsae_guard.cli import main
from vlsae_guard.lab import demo
from vlsae_guard.lab.demo import DemoConfig, run_demo
from vlsae_guard.scoring import pope

ROOT = Path(__file__).resolve().parents[1]


def script_main(argv):
    spec = importlib.util.spec_from_file_location("bench_pope_demo", ROOT / "benchmarks/pope.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_demo_writes_consistent_results(tmp_path, capsys):
    assert script_main(["--demo", "--limit", "9", "--batch-size", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "say nothing about real LLaVA models" in printed and "McNemar p" in printed
    result = json.loads((tmp_path / "results.json").read_text())
    split = result["splits"]["pope_shapes"]
    questions = pope.load_questions(tmp_path / "inputs" / "pope_shapes.jsonl").questions[:9]
    for arm in ("none", "vlsae"):
        path = tmp_path / "answers" / f"{arm}" / "pope_shapes.jsonl"
        rows = {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines())}
        preds = [pope.parse_answer(rows[q.question_id]["text"]) for q in questions]
        metrics = pope.metrics(preds, [q.label for q in questions])
        assert {k: split[arm][k] for k in metrics} == metrics
    assert result["settings"]["sae_sha256"] and result["settings"]["backend"] == "hf"
    assert result["demo"]["sae"]["n_concepts"] == 128
    assert (tmp_path / "results.png").exists() and (tmp_path / "results.md").exists()


def test_cli_demo_is_the_same_run(tmp_path, capsys):
    assert main(["demo", "--images", "3", "--alpha", "1.0", "--out", str(tmp_path)]) == 0
    assert "say nothing about real LLaVA models" in capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["settings"]["guard"]["alpha"] == 1.0
    assert result["splits"]["pope_shapes"]["comparison"]["n"] == 3 * len(demo.SHAPES)


def test_run_demo_takes_a_typed_config_and_parses_no_flags(tmp_path, monkeypatch):
    def no_parsing(*args, **kwargs):
        pytest.fail("run_demo parsed command-line flags")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", no_parsing)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", no_parsing)
    config = DemoConfig(out=tmp_path, n_images=2, limit=4, guard=GuardConfig(alpha=0.7))
    results, text = run_demo(config, progress=False)
    assert results["settings"]["guard"] == GuardConfig(alpha=0.7).model_dump(mode="json")
    assert results["settings"]["limit"] == 4 and results["mean_f1"]["splits"] == ["pope_shapes"]
    assert results["splits"]["pope_shapes"]["comparison"]["n"] == 4
    assert "alpha=0.7" in text and (tmp_path / "results.json").exists()


def test_scenes_match_their_questions():
    scenes = demo.make_scenes(6, seed=1)
    for q in demo.questions(scenes):
        shape = q["text"].split()[3]
        present = any(s == shape for _, s in scenes[q["image"]].objects)
        assert q["label"] == ("yes" if present else "no")


def test_fitted_sae_reconstructs_and_shares(hf_model_and_processor):
    model, processor = hf_model_and_processor
    sae = demo.fit_sae(model, processor, demo.make_scenes(6, seed=0), n_concepts=64, k=8, seed=0)
    assert isinstance(sae, VLSAE)
    assert sae.config.stats["explained_variance_vision"] > 0.5
    assert sae.config.shared_concepts is not None
