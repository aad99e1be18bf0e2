"""The README's demo: runs end to end and its files agree with its printed numbers."""

import json

from vlsae_guard import VLSAE, demo
from vlsae_guard.cli import main
from vlsae_guard.scoring import pope


def test_demo_writes_consistent_results(tmp_path, capsys):
    assert main(["demo", "--images", "4", "--batch-size", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "say nothing about real LLaVA models" in printed
    result = json.loads((tmp_path / "results.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == result["n"] == 4 * len(demo.SHAPES)
    labels = [r["label"] for r in rows]
    for arm, key in (("a", "answer_off"), ("b", "answer_on")):
        assert result[arm] == pope.metrics([pope.parse_answer(r[key]) for r in rows], labels)
    assert result["raw_answers_changed"] == sum(r["answer_off"] != r["answer_on"] for r in rows)
    assert result["raw_answers_changed"] > 0  # the guard reached the model
    assert result["settings"]["versions"]["torch"]


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
