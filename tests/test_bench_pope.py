"""benchmarks/pope.py on the tiny models: batching, resume, outputs, errors (hf and llava)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _pope import answers, run, run_config, texts, write_sae
from PIL import Image

from vlsae_guard import GuardConfig, provenance
from vlsae_guard.harness import generation
from vlsae_guard.harness import pope as harness
from vlsae_guard.harness.config import PopeRunConfig
from vlsae_guard.scoring import pope
from vlsae_guard.scoring.files import DataError

ROOT = Path(__file__).resolve().parents[1]


GUARD = ["--sae", None, "--ab", "--vlsae-alpha", "1.0"]


def guarded(pope_inputs):
    return [str(pope_inputs / "sae") if a is None else a for a in GUARD]


@pytest.mark.parametrize("backend", ["hf", pytest.param("llava", marks=pytest.mark.llava)])
def test_batches_give_the_answers_of_batch_size_one(backend, pope_inputs, tmp_path, request):
    if backend == "llava":
        pytest.importorskip("llava")
        model = request.getfixturevalue("tiny_llava_dir")
    else:
        model = request.getfixturevalue("tiny_hf_dir")
    one = run(
        pope_inputs,
        model,
        tmp_path / "one",
        *guarded(pope_inputs),
        "--batch-size",
        "1",
        backend=backend,
    )
    many = run(
        pope_inputs,
        model,
        tmp_path / "many",
        *guarded(pope_inputs),
        "--batch-size",
        "3",
        backend=backend,
    )
    for arm in ("none", "vlsae"):
        assert texts(tmp_path / "one", arm) == texts(tmp_path / "many", arm)
        assert len(texts(tmp_path / "one", arm)) == 8
    assert texts(tmp_path / "one", "none") != texts(tmp_path / "one", "vlsae")  # the guard acted
    assert one["splits"]["questions"]["none"] == many["splits"]["questions"]["none"]


def test_results_record_provenance_and_match_the_answers(pope_inputs, tiny_hf_dir, tmp_path):
    out = tmp_path / "run"
    results = run(
        pope_inputs, tiny_hf_dir, out, *guarded(pope_inputs), "--batch-size", "4", "--seed", "3"
    )
    table = harness.finish(results, out, "test")
    saved = json.loads((out / "results.json").read_text())
    settings = saved["settings"]
    assert settings["model_sha256"] == provenance.sha256_dir(tiny_hf_dir)
    assert settings["sae_sha256"] == provenance.sha256_dir(pope_inputs / "sae")
    assert settings["guard"]["alpha"] == 1.0 and settings["guard"]["rewrite"] == "replace"
    assert settings["questions"][0]["sha256"] == provenance.sha256_file(
        pope_inputs / "questions.jsonl"
    )
    assert settings["prompt"]["template"] == pope.PROMPTS["llava"]
    assert settings["parser"] == pope.PARSERS[False]
    assert (
        settings["decoding"]["strategy"] == "greedy" and settings["decoding"]["max_new_tokens"] == 4
    )
    assert (settings["seed"], settings["batch_size"], settings["backend"]) == (3, 4, "hf")
    assert settings["environment"]["packages"]["torch"] == torch.__version__
    qs = pope.load_questions(pope_inputs / "questions.jsonl")
    for arm in ("none", "vlsae"):
        by_id = texts(out, arm)
        expected = pope.score(qs, [by_id[q.question_id] for q in qs.questions])
        assert saved["splits"]["questions"][arm] == pytest.approx(expected)
    comparison = saved["splits"]["questions"]["comparison"]
    assert 0 <= comparison["mcnemar_p"] <= 1
    assert comparison["delta"]["f1"] == pytest.approx(
        saved["splits"]["questions"]["vlsae"]["f1"] - saved["splits"]["questions"]["none"]["f1"]
    )
    assert "McNemar p" in table and (out / "results.md").read_text().count("|") > 20
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    with Image.open(out / "results.png") as im:
        im.verify()
    first = answers(out, "vlsae")[0]
    assert first["prompt"] == pope.build_prompt("Is there a dog in the image?")


def test_a_typed_config_runs_exactly_as_the_flags_do(pope_inputs, tiny_hf_dir, tmp_path):
    flags = run(pope_inputs, tiny_hf_dir, tmp_path, *guarded(pope_inputs), "--batch-size", "3")
    typed = run_config(
        pope_inputs, tiny_hf_dir, tmp_path / "typed", sae=pope_inputs / "sae", ab=True,
        guard=GuardConfig(alpha=1.0), batch_size=3,
    )  # fmt: skip
    for arm in ("none", "vlsae"):
        assert texts(tmp_path / "typed", arm) == texts(tmp_path, arm)
    assert texts(tmp_path, "vlsae") != texts(tmp_path, "none")
    for results in (flags, typed):
        for key in ("environment", "generation_seconds", "arm_seconds"):
            results["settings"].pop(key)
    assert typed == flags


def test_a_killed_run_resumes_with_only_the_missing_answers(
    pope_inputs, tiny_hf_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    run(pope_inputs, tiny_hf_dir, out, *guarded(pope_inputs), "--batch-size", "2")
    full = {arm: texts(out, arm) for arm in ("none", "vlsae")}
    path = out / "answers" / "vlsae" / "questions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:15])  # killed while writing the 4th answer

    asked = []
    original = generation.LocalGenerator.generate

    def counting(self, images, prompts, decoding, runner=None):
        asked.extend(prompts)
        return original(self, images, prompts, decoding, runner)

    monkeypatch.setattr(generation.LocalGenerator, "generate", counting)
    run(pope_inputs, tiny_hf_dir, out, *guarded(pope_inputs), "--batch-size", "2")
    assert len(asked) == 5  # questions 4..8 of the guarded arm, nothing of the other
    ids = [r["question_id"] for r in answers(out, "vlsae")]
    assert sorted(ids) == list(range(1, 9)) and len(ids) == len(set(ids))
    assert {arm: texts(out, arm) for arm in ("none", "vlsae")} == full

    asked.clear()  # complete: nothing is generated, not even the model is loaded
    monkeypatch.setattr(generation, "load", lambda *a, **k: pytest.fail("model loaded"))
    assert (
        run(pope_inputs, tiny_hf_dir, out, *guarded(pope_inputs))["splits"]["questions"]["vlsae"][
            "n"
        ]
        == 8
    )


def test_missing_images_are_listed_before_any_generation(
    pope_inputs, tiny_hf_dir, tmp_path, monkeypatch
):
    images = tmp_path / "images"
    images.mkdir()
    (images / "img1.png").write_bytes((pope_inputs / "images" / "img1.png").read_bytes())
    monkeypatch.setattr(generation, "load", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError, match=r"3 of 4 images are missing") as error:
        run(pope_inputs, tiny_hf_dir, tmp_path / "out", "--images", str(images))
    for name in ("img0.png", "img2.png", "img3.png"):
        assert name in str(error.value)
    listing = (tmp_path / "out" / "missing_images.txt").read_text().split()
    assert [Path(p).name for p in listing] == ["img0.png", "img2.png", "img3.png"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ab"], "--ab compares none with a method: give --method M (or --sae DIR)"),
        (["--ab", "vcd"], "--ab takes no method or two (A B), found vcd"),
        (["--ab", "vcd", "vcd"], "--ab compares two different methods, found vcd twice"),
        (["--method", "paper"], "--method paper needs --sae DIR"),
        (["--method", "vcd", "--m3id-lam", "1"], "settings for m3id, which is not an arm"),
        (["--method", "vcd", "--vcd-beta", "2"], "invalid vcd settings"),
        (
            ["--backend", "vllm", "--method", "vcd"],
            "--backend vllm runs none, vlsae, cue-mask only",
        ),
        (["--backend", "openai"], "--base-url URL goes with --backend openai"),
        (["--base-url", "http://x/v1"], "--base-url URL goes with --backend openai"),
        (["--engine-args", '{"max_model_len": 64}'], "--engine-args goes with --backend vllm"),
        (["--backend", "vllm", "--engine-args", "[1]"], "expected a JSON object, found [1]"),
        (["--backend", "vllm", "--engine-args", '{"seed": 1}'], "seed are set by this runner"),
        (["--backend", "vllm", "--device", "cpu"], "--device does not apply to --backend vllm"),
        (
            ["--backend", "vllm", "--sae", "x", "--vlsae-mode", "paper", "--vlsae-layer", "1"],
            "--backend vllm runs none, vlsae, cue-mask only, not paper",
        ),
        (
            ["--backend", "vllm", "--sae", "x", "--vlsae-text-grounded"],
            "--backend vllm runs the projector guard without text_grounded",
        ),
        (
            ["--backend", "openai", "--base-url", "http://x/v1", "--prompt-format", "llava"],
            "the server applies its chat template",
        ),
        (["--backend", "llava", "--prompt-format", "chat-template"], "LLaVA's own conversation"),
        ([], "--images DIR is required"),
    ],
)
def test_script_errors_are_one_line_exit_2(
    argv, message, pope_inputs, tiny_hf_dir, tmp_path, capsys
):
    script = load_script("pope")
    base = ["--model", str(tiny_hf_dir), "--questions", str(pope_inputs / "questions.jsonl")]
    assert script.main([*base, "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_single_arm_runs_and_one_split_per_file(pope_inputs, tiny_hf_dir, tmp_path):
    results = run(pope_inputs, tiny_hf_dir, tmp_path, "--limit", "3", "--prompt", "vcd")
    assert results["arms"] == ["none"] and "comparison" not in results["splits"]["questions"]
    assert results["splits"]["questions"]["none"]["n"] == 3
    assert answers(tmp_path, "none")[0]["prompt"].endswith(
        "Please answer this question with one word."
    )
    assert PopeRunConfig(model="m", sae="x", out=tmp_path).arms == ("vlsae",)


def test_paper_mode_runs_through_the_handles_generate(pope_inputs, tiny_hf_dir, tmp_path):
    paper = [
        "--sae",
        str(pope_inputs / "sae"),
        "--ab",
        "--vlsae-mode",
        "paper",
        "--vlsae-layer",
        "1",
    ]
    results = run(pope_inputs, tiny_hf_dir, tmp_path / "paper", *paper, "--batch-size", "4")
    run(pope_inputs, tiny_hf_dir, tmp_path / "plain", "--batch-size", "4")
    assert results["settings"]["guard"]["mode"] == "paper"
    assert results["arms"] == ["none", "paper"]
    assert texts(tmp_path / "paper", "none") == texts(tmp_path / "plain", "none")
    assert texts(tmp_path / "paper", "paper") != texts(tmp_path / "paper", "none")


def test_paired_outcomes_are_written_per_question(pope_inputs, tiny_hf_dir, tmp_path):
    results = run(pope_inputs, tiny_hf_dir, tmp_path, *guarded(pope_inputs), "--batch-size", "4")
    rows = [
        json.loads(x) for x in (tmp_path / "paired" / "questions.jsonl").read_text().splitlines()
    ]
    assert [r["question_id"] for r in rows] == list(range(1, 9))
    discordant = results["splits"]["questions"]["comparison"]["discordant"]
    assert discordant["a_wrong_b_right"] == sum(
        r["correct_vlsae"] and not r["correct_none"] for r in rows
    )
    assert discordant["a_right_b_wrong"] == sum(
        r["correct_none"] and not r["correct_vlsae"] for r in rows
    )
    assert all(r["none"] == texts(tmp_path, "none")[r["question_id"]] for r in rows)


@pytest.mark.llava
def test_hf_prompt_is_llavas_eval_conversation():
    pytest.importorskip("llava", reason="original LLaVA not installed")
    from vlsae_guard.backends import ensure_llava_importable

    ensure_llava_importable()
    from llava.conversation import conv_templates

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + pope.build_prompt("Is there a dog?"))
    conv.append_message(conv.roles[1], None)
    assert generation.llava_conversation(pope.build_prompt("Is there a dog?")) == conv.get_prompt()


def test_openai_backend_without_a_server_is_one_clear_error(pope_inputs, tmp_path, capsys):
    script = load_script("pope")
    argv = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path)]
    argv += [
        "--questions",
        str(pope_inputs / "questions.jsonl"),
        "--images",
        str(pope_inputs / "images"),
    ]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # With the openai package (the vLLM environment): the server is missing; without: the package.
    assert "http://127.0.0.1:9/v1: no OpenAI-compatible server" in err or (
        "--backend openai needs the openai package" in err
    )
    assert not (tmp_path / "answers").exists()  # nothing written


def test_results_record_the_guards_placement_check(pope_inputs, tiny_hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    results = run(pope_inputs, tiny_hf_dir, out, *guarded(pope_inputs))
    fit = results["settings"]["guard_fit"]
    assert fit["site"] == "projector" and fit["vision_vectors"] > 0
    assert isinstance(fit["explained_variance_vision"], float)
    # The random SAE explains little: the results say so, as the guard warned.
    assert any(w.startswith("guard placement:") for w in results["warnings"])
    monkeypatch.setattr(generation, "load", lambda *a, **k: pytest.fail("model loaded"))
    assert run(pope_inputs, tiny_hf_dir, out, *guarded(pope_inputs))["settings"]["guard_fit"] == fit
    monkeypatch.undo()
    plain = run(pope_inputs, tiny_hf_dir, tmp_path / "plain")
    assert plain["settings"]["guard_fit"] is None


STRONG = {  # settings that change the tiny model's answers, and one field they set
    "vcd": (["--vcd-alpha", "3"], ("alpha", 3.0)),
    "m3id": (["--m3id-lam", "1"], ("lam", 1.0)),
    "dola": (["--dola-layers", "[0, 1]"], ("layers", [0, 1])),
    "pai": (["--pai-start-layer", "0", "--pai-alpha", "2", "--pai-gamma", "2"], ("alpha", 2.0)),
}


@pytest.mark.parametrize("backend", ["hf", pytest.param("llava", marks=pytest.mark.llava)])
@pytest.mark.parametrize("peer", list(STRONG))
def test_a_peer_method_runs_as_an_arm_batched_as_alone(
    peer, backend, pope_inputs, tmp_path, request
):
    """--method M --ab: none vs M; M's settings recorded; batches answer as batch size 1; none
    answers as a run without any method."""
    if backend == "llava":
        pytest.importorskip("llava")
    model = request.getfixturevalue("tiny_llava_dir" if backend == "llava" else "tiny_hf_dir")
    flags, (field, value) = STRONG[peer]
    args = ["--method", peer, "--ab", *flags, "--backend", backend]
    one = run(pope_inputs, model, tmp_path / "one", *args, "--batch-size", "1")
    run(pope_inputs, model, tmp_path / "many", *args, "--batch-size", "3")
    run(pope_inputs, model, tmp_path / "plain", "--batch-size", "3", "--backend", backend)
    assert one["arms"] == ["none", peer] and one["settings"]["method"] == peer
    recorded = one["settings"]["method_settings"][peer]
    assert recorded[field] == value
    for arm in ("none", peer):
        assert texts(tmp_path / "one", arm) == texts(tmp_path / "many", arm)
    assert texts(tmp_path / "one", "none") == texts(tmp_path / "plain", "none")
    assert texts(tmp_path / "one", peer) != texts(tmp_path / "one", "none")  # it acted
    sidecar = json.loads(
        (tmp_path / "one" / "answers" / peer / "questions.settings.json").read_text()
    )
    assert sidecar["method"] == peer and sidecar["method_settings"] == recorded


def test_two_methods_compare_b_minus_a_and_resume(pope_inputs, tiny_hf_dir, tmp_path):
    results = run(pope_inputs, tiny_hf_dir, tmp_path, "--ab", "vcd", "m3id", "--batch-size", "4")
    assert results["arms"] == ["vcd", "m3id"]
    split = results["splits"]["questions"]
    assert split["comparison"]["delta"]["f1"] == pytest.approx(
        split["m3id"]["f1"] - split["vcd"]["f1"], abs=1e-9
    )
    # other settings for an arm: its answers are refused, naming what changed
    with pytest.raises(
        DataError, match=r"answers/vcd/questions.jsonl .*\(method_settings differ\)"
    ):
        run(pope_inputs, tiny_hf_dir, tmp_path, "--ab", "vcd", "m3id", "--vcd-alpha", "2")


def test_an_output_directory_of_the_old_layout_is_refused(pope_inputs, tiny_hf_dir, tmp_path):
    (tmp_path / "answers" / "guard-off").mkdir(parents=True)
    with pytest.raises(harness.common.BenchmarkError, match="rename answers/guard-off"):
        run(pope_inputs, tiny_hf_dir, tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--method", "pai"],
            "pai: layers 2 .. 1 are asked for",
        ),  # the tiny model has 2 layers: PAI cannot attach
        (["--sae", "NARROW", "--ab"], "method 'vlsae'"),  # an SAE for another model width
    ],
)
def test_a_method_that_cannot_attach_is_one_line_exit_2(
    argv, message, pope_inputs, tiny_hf_dir, tmp_path, capsys
):
    """Found when the model is loaded, after the flags were valid: still no traceback."""
    narrow = str(write_sae(tmp_path, d_in=32))
    argv = [narrow if a == "NARROW" else a for a in argv]
    script = load_script("pope")
    base = ["--model", str(tiny_hf_dir), "--questions", str(pope_inputs / "questions.jsonl")]
    base += ["--images", str(pope_inputs / "images"), "--max-new-tokens", "2"]
    assert script.main([*base, "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
