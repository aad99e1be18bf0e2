"""The CPU hallucination lab: world and its two planted causes, POPE question sets, model
training/caching, the diagnostic, selection, pooling, and a --fast end-to-end run of
benchmarks/testbed.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlsae_guard.core.object_evidence import ObjectConcepts
from vlsae_guard.lab.testbed import diagnostic, evaluation, experiment, pooling
from vlsae_guard.lab.testbed.model import ModelConfig, TrainingConfig, trained_model
from vlsae_guard.lab.testbed.recipe import RecipeConfig, embedded_loss, tower_features
from vlsae_guard.lab.testbed.world import (
    QUESTION_SETS,
    ContextConfig,
    Statistics,
    WorldConfig,
    build_world,
    mentioned,
)

ROOT = Path(__file__).resolve().parents[1]
WORLD = WorldConfig(n_train=1500, n_val=40, n_test=120)


@pytest.fixture(scope="session")
def world():
    return build_world(WORLD, seed=3)


def _fast(root: Path) -> dict:
    """benchmarks/testbed.py --fast on one seed, from an empty cache; its results.json."""
    spec = importlib.util.spec_from_file_location("testbed_bench", ROOT / "benchmarks/testbed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--fast", "--seeds", "0", "--out", str(root / "out"), "--cache", str(root / "cache")]
    assert bench.main([*argv, "--quiet"]) == 0
    return json.loads((root / "out" / "results.json").read_text())


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory):
    """The --fast run (the expensive fixture)."""
    root = tmp_path_factory.mktemp("testbed")
    return root, _fast(root)


def test_world_is_deterministic_per_seed(world):
    again = build_world(WORLD, seed=3)
    other = build_world(WORLD, seed=4)
    for split in ("train", "test"):
        a, b = world.splits[split][:20], again.splits[split][:20]
        assert [s.objects for s in a] == [s.objects for s in b]
        pixels = zip(a, b, strict=True)
        assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in pixels)
    assert [s.objects for s in other.splits["train"][:20]] != [
        s.objects for s in world.splits["train"][:20]
    ]
    assert world.questions("test") == again.questions("test")


def test_planted_bias_in_train_and_broken_in_val_and_test(world):
    train = world.statistics
    for a, b in WORLD.bias_pairs:
        assert train.rate(a, b) == pytest.approx(WORLD.bias_rate, abs=0.05)
        for split in ("val", "test"):
            assert Statistics.of(world.splits[split]).rate(a, b) < 0.6
    # a rate of 0 plants the opposite: B never with A
    anti = build_world(WORLD.model_copy(update={"bias_rate": 0.0, "n_train": 300}), seed=3)
    assert all(anti.statistics.rate(a, b) == 0 for a, b in WORLD.bias_pairs)


def test_captions_mention_exactly_the_objects_present(world):
    for scene in world.splits["train"][:300]:
        assert mentioned(scene.caption, WORLD) == scene.present
        assert WORLD.min_objects <= len(scene.objects) <= WORLD.max_objects


def test_pope_question_sets(world):
    sets = world.questions("test")
    assert set(sets) == set(QUESTION_SETS)
    scenes = {s.name: s for s in world.splits["test"]}
    freq = world.statistics.frequency
    for kind in ("random", "popular", "adversarial"):
        qs = sets[kind]
        assert sum(q.label == "yes" for q in qs) == sum(q.label == "no" for q in qs)
        for q in qs:
            assert (q.name in scenes[q.image].present) == (q.label == "yes")
            assert q.text == f"Is there a {q.name} in the image?"
        for image, scene in scenes.items():
            neg = [q.name for q in qs if q.image == image and q.label == "no"]
            absent = [n for n in WORLD.names if n not in scene.present]
            if kind == "popular":
                ranked = sorted(absent, key=lambda n: (-freq[n], n))
                assert neg == ranked[: len(neg)]
            if kind == "adversarial":
                score = {
                    n: sum(world.statistics.together(n, p) for p in scene.present) for n in absent
                }
                assert min((score[n] for n in neg), default=0) >= max(
                    (score[n] for n in absent if n not in neg), default=0
                )
    # an image with A and not B gets B as its most adversarial negative
    a, b = WORLD.bias_pairs[0]
    hit = [s for s in scenes.values() if a in s.present and b not in s.present]
    assert hit
    for scene in hit:
        neg = [q.name for q in sets["adversarial"] if q.image == scene.name and q.label == "no"]
        assert b in neg
    for q in sets["bias"]:
        pair = next(p for p in WORLD.bias_pairs if p[1] == q.name)
        present = scenes[q.image].present
        assert (q.label == "no") == (pair[0] in present and q.name not in present)


def test_world_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown classes"):
        WorldConfig(bias_pairs=(("ball", "zebra"),))
    with pytest.raises(ValueError, match="absent objects"):
        WorldConfig(max_objects=8)


def test_context_cause_is_planted_in_train_unnamed_and_broken_in_test(world):
    c = WORLD.context_object
    assert c == "ring"  # "auto": the last class in no bias pair
    for split, scenes in world.splits.items():
        stripes = [s for s in scenes if s.stripes]
        plain = [s for s in scenes if not s.stripes]
        assert 0.2 < len(stripes) / len(scenes) < 0.4  # share 0.3
        rate = sum(c in s.present for s in stripes) / len(stripes)
        base = sum(c in s.present for s in plain) / len(plain)
        if split == "train":
            assert rate > 0.75 and base < 0.15
        else:
            assert abs(rate - base) < 0.25  # drawn independently of the stripes
    for scene in world.splits["train"][:300]:
        assert "stripe" not in scene.caption  # the cue is never named
    # the stripes are drawn: striped images differ from their background in many pixels
    scene = next(s for s in world.splits["test"] if s.stripes)
    pixels = np.asarray(scene.image).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - (35, 95, 120)).max(1) < 40).mean() > 0.1
    test = {s.name: s for s in world.splits["test"]}
    questions = world.questions("test")["context"]
    assert {q.label for q in questions} == {"yes", "no"}
    for q in questions:
        scene = test[q.image]
        assert q.name == c
        assert (q.label == "no") == (scene.stripes and c not in scene.present)
        assert (q.label == "yes") == (c in scene.present and not scene.stripes)


def test_the_v1_config_draws_exactly_the_world_of_before_the_lab():
    """benchmarks/configs/testbed-scratch-v1.json (the earlier tables' configuration): the same
    images and captions as the code before issue 16 drew (sha256 of its pixels and captions,
    taken from that code, on a smaller world)."""
    import hashlib

    v1 = experiment.ExperimentConfig.model_validate_json(
        (ROOT / "benchmarks" / "configs" / "testbed-scratch-v1.json").read_text()
    )
    assert v1.recipe.kind == "scratch" and v1.training.steps == 2000 and not v1.eval.peers
    config = v1.world.model_copy(update={"n_train": 64, "n_val": 16, "n_test": 16})
    digest = hashlib.sha256()
    for scenes in build_world(config, seed=3).splits.values():
        for scene in scenes:
            digest.update(scene.image.tobytes())
            digest.update(scene.caption.encode())
    assert digest.hexdigest() == (
        "373d7b074d9e41f42ce0294adba5c50230c5240962f2a17325f50de38def507d"
    )
    assert config.question_sets == ("random", "popular", "adversarial", "bias")
    assert config.causes == {"cooccurrence": "bias"}


def test_context_object_must_be_a_free_class():
    with pytest.raises(ValueError, match=r"context.object: .*found 'kite'"):
        WorldConfig(context=ContextConfig(object="kite"))  # a bias pair's B
    with pytest.raises(ValueError, match="context.object"):
        WorldConfig(context=ContextConfig(object="zebra"))
    assert WorldConfig(context=ContextConfig(object="apple")).context_object == "apple"


def test_a_config_written_before_the_lab_loads_and_plants_cooccurrence(tmp_path):
    """Issue 16, ask 7: world.classes / bias_pairs / bias_rate as today's configs write them."""
    old = {
        "world": {
            "classes": [
                {"name": n, "shape": sh, "colour": co}
                for n, sh, co in [
                    ("ball", "circle", "red"), ("box", "square", "blue"),
                    ("kite", "triangle", "yellow"), ("cake", "triangle", "pink"),
                    ("ring", "ring", "purple"),
                ]
            ],
            "bias_pairs": [["ball", "kite"]],
            "bias_rate": 0.95,
            "max_objects": 3,
            "n_train": 400,
        }
    }  # fmt: skip
    config = experiment.ExperimentConfig.model_validate_json(json.dumps(old))
    assert config.world.bias_rate == 0.95 and config.world.context_object == "ring"
    world = build_world(config.world, seed=0)
    assert world.statistics.rate("ball", "kite") > 0.9
    assert set(world.questions("val")) == set(QUESTION_SETS)


def test_diagnostic_images_hold_what_each_condition_says(world):
    rng = np.random.default_rng(0)
    for cause in diagnostic.cues(world):
        cue, b = cause["cue"], cause["object"]
        for condition in ("cue_only", "neither", "b_small", "b_large"):
            scenes = diagnostic.scenes(world, cue, b, condition, 6, rng)
            for scene in scenes:
                has_cue = scene.stripes if cue == "stripes" else cue in scene.present
                assert has_cue == (condition == "cue_only")
                assert (b in scene.present) == condition.startswith("b_")
        small = diagnostic.scenes(world, cue, b, "b_small", 20, np.random.default_rng(1))
        large = diagnostic.scenes(world, cue, b, "b_large", 20, np.random.default_rng(1))
        side = [
            np.mean([s.boxes[s.objects.index(b)][2] - s.boxes[s.objects.index(b)][0] for s in x])
            for x in (small, large)
        ]
        scale = next(c.scale for c in WORLD.classes if c.name == b)
        assert side[1] > side[0] if scale < 1 else side[1] == side[0]


def test_trained_model_loads_in_hub_layout_and_is_cached(world, tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    small = build_world(WORLD.model_copy(update={"n_train": 16}), seed=3)
    config, training = ModelConfig(), TrainingConfig(steps=2, batch_size=4)
    first = trained_model(small, config, training, tmp_path, log=lambda *_: None)
    assert not first.cached
    with safe_open(first.path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert not any(k.startswith("model.") for k in keys)
    model = AutoModelForImageTextToText.from_pretrained(first.path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    state = {k: v for k, v in model.state_dict().items() if "vision_tower" in k}
    assert state and all(torch.isfinite(v).all() for v in state.values())

    from vlsae_guard.lab.testbed import model as model_module

    def refuse(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(model_module, "train", refuse)
    again = trained_model(small, config, training, tmp_path, log=lambda *_: None)
    assert again.cached and again.path == first.path and again.sha256 == first.sha256
    other = TrainingConfig(steps=3, batch_size=4)
    with pytest.raises(AssertionError, match="retrained"):
        trained_model(small, config, other, tmp_path, log=lambda *_: None)


def test_training_is_deterministic(tmp_path):
    small = build_world(WORLD.model_copy(update={"n_train": 16}), seed=5)
    config, training = ModelConfig(), TrainingConfig(steps=3, batch_size=4)
    a = trained_model(small, config, training, tmp_path / "a", log=lambda *_: None)
    b = trained_model(small, config, training, tmp_path / "b", log=lambda *_: None)
    assert a.sha256 == b.sha256


def _val(name, alpha, on, off=50.0, family="vlsae"):
    return {
        "name": name,
        "family": family,
        "settings": {"alpha": alpha},
        "mean_f1": {"off": off, "on": on},
        "hallucination": {"cooccurrence": {"off": 30.0, "on": 20.0}},
    }


def test_choose_is_a_function_of_validation_numbers_only():
    val = [
        _val("replace", 0.25, 70.0),
        _val("replace", 0.5, 80.0),
        _val("replace", 1.0, 80.0),  # tie: the earlier candidate in the grid wins
        _val("edit", 0.5, 40.0),
        _val("edit", 1.0, 45.0),
        _val("vcd", 1.0, 90.0, family="peer"),
    ]
    chosen = evaluation.choose(val)
    alphas = {k: v["settings"]["alpha"] for k, v in chosen.items()}
    assert alphas == {"replace": 0.5, "edit": 1.0, "vcd": 1.0}
    assert chosen["replace"]["val_mean_f1"] == {"off": 50.0, "on": 80.0}
    # "selected" is a VL-SAE variant, however well a peer scored
    assert evaluation.select(chosen) == "replace"


def test_peer_grids_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="grid of pai"):
        evaluation.Peer(method="pai", grid=({"alpha": -1.0},))
    with pytest.raises(ValueError, match="selected"):
        evaluation.EvalConfig(variants=(evaluation.Variant(name="selected"),))
    with pytest.raises(ValueError, match="distinct"):
        evaluation.EvalConfig(variants=(evaluation.Variant(name="vcd"),))


def test_fast_end_to_end_results(fast_run):
    root, results = fast_run
    config = experiment.ExperimentConfig.fast()
    variants = [v.name for v in config.eval.variants]
    peers = [p.name for p in config.eval.peers]
    assert results["seeds"] == [0]
    assert set(results["config"]) == {"world", "model", "training", "recipe", "sae", "eval"}
    assert results["environment"]["packages"]["torch"]
    (seed,) = results["per_seed"]
    assert len(seed["model"]["sha256"]) == 64 and seed["model"]["training"]["loss"]
    assert {"projector", f"layer:{config.paper_layer}"} == set(seed["sae"])
    assert all(len(s["sha256"]) == 64 for s in seed["sae"].values())
    # cue masking's object map, fitted on the training captions, beside the projector SAE
    objects = ObjectConcepts.load(Path(seed["sae"]["projector"]["path"]) / "objects.json")
    assert objects.fitted_on["split"] == "train" and objects.objects
    grids = sum(len(v.candidates(config.eval.alphas)) for v in config.eval.variants)
    grids += sum(len(p.grid) for p in config.eval.peers)
    assert len(seed["validation"]) == grids
    assert set(seed["chosen"]) == set(variants + peers)
    assert seed["selected"] in variants
    for name in variants + peers:
        run = seed["test"][name]
        assert run["settings"] == seed["chosen"][name]["settings"]
        method = {"paper": "paper", "cue-mask": "cue-mask"}.get(name, "vlsae")
        assert run["arms"] == ["none", method if name in variants else name]
        assert set(run["splits"]) == set(QUESTION_SETS)
        for split in run["splits"].values():
            assert set(split["off"]) >= {"f1", "precision", "yes_ratio"}
            assert 0 <= split["mcnemar_p"] <= 1
        assert set(run["causes"]) == {"cooccurrence", "context"}
        for cause in run["causes"].values():
            assert {"off", "on", "n", "mcnemar_p", "recall_off", "recall_on"} <= set(cause)
        agg = results["aggregate"][name]
        assert agg["splits"]["random"]["off"]["f1"]["mean"] == run["splits"]["random"]["off"]["f1"]
    # only the first test run generated plain decoding; the others reused its answers
    assert [n for n, r in seed["test"].items() if "none" in r["arm_seconds"]] == [variants[0]]
    assert seed["none_seconds"] > 0
    assert set(seed["seconds"]) == {"world", "model", "diagnostic", "sae", "validation", "test"}
    assert {r["cause"] for r in seed["diagnostic"]} == {"cooccurrence", "context"}
    for row in seed["diagnostic"]:
        assert all(0 < row[c] < 1 for c in diagnostic.CONDITIONS)
        logit = [np.log(row[c] / (1 - row[c])) for c in ("cue_only", "no_image")]
        assert row["no_image_contrast"] == pytest.approx(logit[0] - logit[1], abs=1e-3)
    assert set(seed["probe"]["context"]) == {"stripes->ring"}
    recipe = seed["recipe"]
    assert recipe["kind"] == config.recipe.kind
    assert recipe["random_accuracy"] == run["splits"]["random"]["off"]["accuracy"]
    assert recipe["shared_concepts"] >= 0 and 0 <= recipe["cross_modal_overlap"] <= 1
    assert (recipe["zero_shot"] is None) == (config.recipe.kind == "scratch")
    summary = results["summary"]
    assert len(summary) == 2 * (len(variants) + len(peers) + 1)
    for row in summary:
        assert tuple(row) == pooling.SUMMARY_FIELDS
        run = seed["test"][seed["selected"] if row["variant"] == "selected" else row["variant"]]
        cause = run["causes"][row["cause"]]
        assert row["hallucination_off"] == cause["off"] and row["n"] == cause["n"]
        assert row["family"] == ("peer" if row["variant"] in peers else "vlsae")
        assert row["cost_ratio"] > 0
    md = (root / "out" / "results.md").read_text()
    assert "hallucination % off" in md and "| vcd | peer | context |" in md
    # the validation runs and the test runs read different images
    val_q = (root / "out" / "seed-0" / "val" / "random.jsonl").read_text()
    assert "test_" not in val_q and "val_" in val_q


def test_the_whole_experiment_is_deterministic_given_the_seed(fast_run, tmp_path):
    """A second run in other folders: same model, same SAEs, same choices, same answers."""
    _, first = fast_run
    second = _fast(tmp_path)
    a, b = first["per_seed"][0], second["per_seed"][0]
    assert a["model"]["sha256"] == b["model"]["sha256"]
    # (the SAE folders' own hashes differ: their provenance names the run's folders)
    assert {k: v["weights_sha256"] for k, v in a["sae"].items()} == {
        k: v["weights_sha256"] for k, v in b["sae"].items()
    }
    assert a["chosen"] == b["chosen"] and a["selected"] == b["selected"]
    for name, run in a["test"].items():
        assert run["splits"] == b["test"][name]["splits"], name
        assert run["causes"] == b["test"][name]["causes"], name
    assert first["summary"] == [
        {**row, "cost_ratio": first["summary"][i]["cost_ratio"]}
        for i, row in enumerate(second["summary"])
    ]


def test_ridge_probe_reads_a_linear_signal_and_not_noise():
    from vlsae_guard.lab.testbed.probe import balanced_accuracy, ridge_scores

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g, dtype=torch.float64)
    y = x[:, 3] + 0.3 * x[:, 5] > 0.8  # a minority class, linearly separable
    says = ridge_scores(x[:400], y[:400], x[400:], lam=1e-3) > 0
    assert balanced_accuracy(says, y[400:]) > 0.8  # least squares on a minority class: < 1
    noise = torch.rand(600, generator=g) < 0.3
    says = ridge_scores(x[:400], noise[:400], x[400:], lam=1e-3) > 0
    assert abs(balanced_accuracy(says, noise[400:]) - 0.5) < 0.1
    assert (
        balanced_accuracy(torch.zeros(4, dtype=torch.bool), torch.tensor([1, 0, 0, 0]) > 0) == 0.5
    )


def test_probe_on_the_fast_run_model(fast_run):
    from vlsae_guard.lab.testbed.probe import probe

    _, results = fast_run
    config = experiment.ExperimentConfig.fast()
    world = build_world(config.world, seed=0)
    out = probe(results["per_seed"][0]["model"]["path"], world, n_images=48)
    assert set(out["balanced_accuracy"]) == set(config.world.names)
    assert all(0 <= v <= 1 for v in out["balanced_accuracy"].values())
    for (a, b), pair in zip(config.world.bias_pairs, out["bias_pairs"].values(), strict=True):
        broken = [s for s in world.splits["test"] if a in s.present and b not in s.present]
        assert pair["n_without_b"] == len(broken)


# --- the LLaVA recipe (issue 16) ---------------------------------------------------------------

SMALL_RECIPE = RecipeConfig(
    kind="llava", clip_steps=3, clip_batch_size=8, lm_warmup_steps=2, projector_steps=2
)


def test_embedded_loss_is_llavas_loss_from_pixels(world, tmp_path):
    """Stages (b) and (c) feed the frozen tower's features through the projector themselves:
    the same loss as LlavaForConditionalGeneration given the pixels."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlsae_guard.lab import tiny
    from vlsae_guard.lab.testbed.model import _Batcher
    from vlsae_guard.lab.testbed.world import CAPTION_PROMPT

    sizes = ModelConfig(vision_hidden=32, vision_intermediate=64, vision_heads=1).sizes(32)
    path = tiny.build_hf_llava(tmp_path / "m", seed=0, **vars(sizes))
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    scenes = world.splits["train"][:4]
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")[
        "pixel_values"
    ]
    batch = _Batcher(processor, sizes.image_seq_length)(
        [(CAPTION_PROMPT, s.caption) for s in scenes]
    )
    image_token = processor.tokenizer.convert_tokens_to_ids(tiny.IMAGE)
    with torch.no_grad():
        ours = embedded_loss(model, tower_features(model, pixels), batch, image_token)
        theirs = model(pixel_values=pixels, **batch).loss
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_llava_recipe_is_deterministic_and_records_its_stages(tmp_path):
    small = build_world(WORLD.model_copy(update={"n_train": 16, "n_test": 12}), seed=5)
    config, training = ModelConfig(), TrainingConfig(steps=3, batch_size=4)
    a = trained_model(small, config, training, tmp_path / "a", lambda *_: None, SMALL_RECIPE)
    b = trained_model(small, config, training, tmp_path / "b", lambda *_: None, SMALL_RECIPE)
    assert a.sha256 == b.sha256
    scratch = trained_model(small, config, training, tmp_path / "a", lambda *_: None)
    assert scratch.sha256 != a.sha256 and "recipe" not in scratch.record
    stages = a.record["recipe"]["stages"]
    assert {"clip", "lm_warmup", "projector"} <= set(stages) and a.record["loss"]
    zero_shot = stages["clip"]["zero_shot"]
    assert 0 <= zero_shot["top1"] <= 1 and 0 <= zero_shot["recall"] <= 1 and zero_shot["n"] == 12
    assert a.record["recipe"]["kind"] == "llava"


def test_recipe_keeps_scratch_cache_keys_and_old_configs_load(world):
    from vlsae_guard.lab.testbed.model import cache_key

    config, training = ModelConfig(), TrainingConfig()
    scratch = RecipeConfig(kind="scratch")
    assert cache_key(world, config, training) == cache_key(world, config, training, scratch)
    assert cache_key(world, config, training, SMALL_RECIPE) != cache_key(world, config, training)
    old = experiment.ExperimentConfig().model_dump(mode="json")
    del old["recipe"]  # a config written before recipes existed
    assert experiment.ExperimentConfig.model_validate(old).recipe == RecipeConfig()
    with pytest.raises(ValueError):
        RecipeConfig(kind="clip-only")


def test_testbed_plant_reads_the_validation_split(fast_run, tmp_path, capsys):
    """benchmarks/testbed_plant.py on the --fast configuration: the cached model of the fast
    run (no training), rates per question set, the diagnostic per cause."""
    root, results = fast_run
    spec = importlib.util.spec_from_file_location("plant", ROOT / "benchmarks/testbed_plant.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = tmp_path / "fast.json"
    config.write_text(experiment.ExperimentConfig.fast().model_dump_json())
    argv = ["--config", str(config), "--seeds", "0", "--out", str(tmp_path / "out")]
    assert bench.main([*argv, "--cache", str(root / "cache"), "--images", "2"]) == 0
    plant = json.loads((tmp_path / "out" / "plant.json").read_text())
    (seed,) = plant["seeds"]
    assert seed["model_sha256"] == results["per_seed"][0]["model"]["sha256"]  # the cached one
    assert set(seed["validation"]) == set(QUESTION_SETS)
    for entry in seed["validation"].values():
        assert 0 <= entry["accuracy"] <= 100 and entry["n"] > 0
    assert {r["cause"] for r in seed["diagnostic"]} == {"cooccurrence", "context"}
    assert "| 0 |" in capsys.readouterr().out
    assert bench.main(["--config", str(tmp_path / "missing.json")]) == 2


def test_a_world_the_lab_never_saw_runs_end_to_end(tmp_path):
    """Held-out worlds go through the same code: other classes, one bias pair, no context cause
    (its set, its summary rows and its diagnostic row are absent, not empty)."""
    from vlsae_guard.lab.testbed.world import ObjectClass

    classes = tuple(
        ObjectClass(name=n, shape=sh, colour=co)
        for n, sh, co in [
            ("ball", "circle", "red"), ("box", "square", "blue"), ("kite", "triangle", "yellow"),
            ("cake", "triangle", "pink"), ("ring", "ring", "purple"),
        ]
    )  # fmt: skip
    fast = experiment.ExperimentConfig.fast()
    world = fast.world.model_copy(
        update={
            "classes": classes,
            "bias_pairs": (("ball", "kite"),),
            "max_objects": 3,
            "context": ContextConfig(object=None),
        }
    )
    config = fast.model_copy(update={"world": WorldConfig.model_validate(world.model_dump())})
    results = experiment.run(config, [1], tmp_path / "out", tmp_path / "cache", log=lambda *_: None)
    (seed,) = results["per_seed"]
    assert {r["cause"] for r in results["summary"]} == {"cooccurrence"}
    assert [r["cause"] for r in seed["diagnostic"]] == ["cooccurrence"]
    assert seed["probe"]["context"] is None
    assert all(
        set(run["splits"]) == set(config.world.question_sets) for run in seed["test"].values()
    )
    assert "no unnamed context cause" in pooling.report(results)


def test_auc_and_paired_concepts_on_planted_codes():
    from vlsae_guard.lab.testbed.evidence import auc, paired_concepts
    from vlsae_guard.lab.testbed.world import Scene

    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0 and auc([1.0], [2.0]) == 0.0
    assert auc([1.0, 1.0], [1.0]) == 0.5 and auc([], [1.0]) is None
    g = torch.Generator().manual_seed(0)
    scenes, codes = [], []
    for i in range(40):
        has = i % 3 == 0
        code = torch.rand(4, 10, generator=g) * 0.1
        code[:, 7] += 1.0 if has else 0.0  # concept 7 fires on the object's images
        scenes.append(Scene(f"{i}.png", ["kite"] if has else ["ball"], [], None, ""))
        codes.append(code)
    mask = paired_concepts(codes, scenes, "kite", top=1)
    assert mask.nonzero().flatten().tolist() == [7]
    assert not paired_concepts(codes, scenes, "ring", top=1).any()  # never named: none


def test_testbed_evidence_on_the_fast_run(fast_run, capsys):
    """benchmarks/testbed_evidence.py reads a finished run: one row per seed and cause."""
    root, results = fast_run
    spec = importlib.util.spec_from_file_location("ev", ROOT / "benchmarks/testbed_evidence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--run", str(root / "out")]) == 0
    saved = json.loads((root / "out" / "evidence.json").read_text())
    (seed,) = saved["seeds"]
    assert [r["cause"] for r in seed["causes"]] == ["cooccurrence", "cooccurrence", "context"]
    for row in seed["causes"]:
        assert row["shared_concepts"] > 0 and row["paired_concepts"] <= saved["top"]
        for route in ("shared", "paired"):
            assert 0 <= row[f"{route}_fires"] <= 1
            assert row[f"{route}_auc"] is None or 0 <= row[f"{route}_auc"] <= 1
        for key in ("regressed_auc", "regressed_pass_cue", "regressed_pass_b"):
            assert row[key] is None or 0 <= row[key] <= 1
    assert saved["floor"] == 0.9
    assert "| 0 | context | stripes -> ring |" in capsys.readouterr().out
    assert bench.main(["--run", str(root / "missing")]) == 2


# --- steering from the vision tower (issue 18) ----------------------------------------------------


def test_steering_the_fast_model_from_its_vision_tower(fast_run, tmp_path, capsys):
    """benchmarks/testbed_steer.py --fast on the fast run's cached model: a Matryoshka SAE at the
    layer the model reads, each object's (concept, clamp) the best of its validation grid."""
    root, _ = fast_run
    spec = importlib.util.spec_from_file_location(
        "steer_bench", ROOT / "benchmarks/testbed_steer.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--fast", "--seeds", "0", "--cache", str(root / "cache"), "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    (seed,) = json.loads((tmp_path / "steer.json").read_text())["seeds"]
    assert seed["site"] == "vision_tower:0"  # the fast model reads its first of 2 vision layers
    assert seed["sae"]["groups"] and seed["sae"]["threshold"] > 0
    names = experiment.ExperimentConfig.fast().world.names
    assert [o["object"] for o in seed["objects"]] == names
    for o in seed["objects"]:
        assert len(o["validation"]) == 2 * 2  # candidates x values
        assert o["chosen"] == max(o["validation"], key=lambda t: t["gain"])
        assert 0 <= o["yes_plain"] <= 100 and 0 <= o["yes_steered"] <= 100
    assert seed["reconstruction"]["questions"] > 0
    assert "| 0 | ball |" in capsys.readouterr().out
