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
from vlsae_guard.lab.testbed.experiment import ExperimentConfig
from vlsae_guard.scoring import pope

ROOT = Path(__file__).resolve().parents[1]


def script_main(argv):
    spec = importlib.util.spec_from_file_location("bench_pope_demo", ROOT / "benchmarks/pope.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


FAST = ExperimentConfig.fast()


@pytest.fixture
def fast_lab(monkeypatch):
    """The demo's flags and commands with the lab's tiny configuration (seconds, not a minute);
    the real configuration runs in the slow test below."""
    monkeypatch.setattr(ExperimentConfig, "demo", classmethod(lambda cls: FAST))


def test_demo_writes_consistent_results(tmp_path, capsys, fast_lab):
    argv = ["--demo", "--limit", "9", "--batch-size", "4", "--out", str(tmp_path)]
    assert script_main(argv) == 0
    printed = capsys.readouterr().out
    assert "planted named co-occurrence ball -> kite" in printed and "McNemar p" in printed
    assert "planted unnamed context stripes -> ring" in printed
    assert "guard: cue-mask" in printed  # the demo's guard unless a --vlsae-* flag says otherwise
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["arms"] == ["none", "cue-mask"]
    assert result["mean_f1"]["splits"] == list(FAST.world.question_sets)
    for name in FAST.world.question_sets:
        split = result["splits"][name]
        questions = pope.load_questions(tmp_path / "inputs" / "test" / f"{name}.jsonl")
        questions = questions.questions[:9]
        for arm in ("none", "cue-mask"):
            path = tmp_path / "answers" / arm / f"{name}.jsonl"
            rows = {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines())}
            preds = [pope.parse_answer(rows[q.question_id]["text"]) for q in questions]
            metrics = pope.metrics(preds, [q.label for q in questions])
            assert {k: split[arm][k] for k in metrics} == metrics
    assert result["settings"]["sae_sha256"] and result["settings"]["backend"] == "hf"
    assert result["demo"]["lab"] == FAST.model_dump(mode="json")
    assert set(result["demo"]["causes"]) == {"cooccurrence", "context"}
    assert (tmp_path / "results.png").exists() and (tmp_path / "results.md").exists()
    # a second run loads the cached model instead of training it again
    assert script_main([*argv, "--seed", "0"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["demo"]["model"]["cached"]


def test_cli_demo_is_the_same_run(tmp_path, capsys, fast_lab):
    assert main(["demo", "--images", "3", "--alpha", "1.0", "--out", str(tmp_path)]) == 0
    assert "planted" in capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["settings"]["guard"]["alpha"] == 1.0
    lines = (tmp_path / "inputs" / "test" / "random.jsonl").read_text().splitlines()
    images = {json.loads(line)["image"] for line in lines}
    assert len(images) == 3


def test_run_demo_takes_a_typed_config_and_parses_no_flags(tmp_path, monkeypatch):
    def no_parsing(*args, **kwargs):
        pytest.fail("run_demo parsed command-line flags")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", no_parsing)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", no_parsing)
    config = DemoConfig(out=tmp_path, n_images=2, limit=4, guard=GuardConfig(alpha=0.7), lab=FAST)
    results, text = run_demo(config, progress=False)
    assert results["settings"]["guard"] == GuardConfig(alpha=0.7).model_dump(mode="json")
    assert results["settings"]["limit"] == 4
    assert results["splits"]["random"]["comparison"]["n"] <= 4
    assert "alpha=0.7" in text and (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_the_readme_demo_shows_a_planted_hallucination(tmp_path):
    """The real demo configuration, from an empty cache: the guard-off arm hallucinates on
    both planted causes (issue 16: the demo's table must show one)."""
    results, _ = run_demo(DemoConfig(out=tmp_path), progress=False)
    causes = results["demo"]["causes"]
    assert causes["cooccurrence"]["off"] >= 50 and causes["context"]["off"] >= 50
    # Above chance (50%), not how far: the trained model follows the CPU's float rounding
    # (seed 0, same pins: 75.0% where the docs were measured, 66.3% on an AMX machine).
    assert results["splits"]["random"]["none"]["accuracy"] >= 60


def test_fitted_sae_reconstructs_and_shares(hf_model_and_processor):
    model, processor = hf_model_and_processor
    sae = demo.fit_sae(model, processor, demo.make_scenes(6, seed=0), n_concepts=64, k=8, seed=0)
    assert isinstance(sae, VLSAE)
    assert sae.config.stats["explained_variance_vision"] > 0.5
    assert sae.config.shared_concepts is not None
