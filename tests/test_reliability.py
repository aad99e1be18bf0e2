"""What a hostile-but-fair probe found (issue 13), one test per finding: each input gets a clear
refusal and nothing on disk or in the model is lost. The serving probes are in test_serving.py
(fast) and test_vllm_server.py (a real server)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from _pope import run, write_inputs, write_sae
from transformers import GPT2Config, LlamaConfig

from vlsae_guard import GuardConfig, GuardError, UnsupportedModelError, guard
from vlsae_guard.cli import main
from vlsae_guard.cli.guard_flags import GuardFlagsError, add_guard_flags, settings_from_args
from vlsae_guard.core.checkpoint import import_official, load
from vlsae_guard.harness import generation
from vlsae_guard.harness import pope as harness
from vlsae_guard.outputs import OutputError, write_text
from vlsae_guard.scoring.files import DataError


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_images):
    root = write_inputs(tmp_path_factory.mktemp("probe-inputs"), tiny_images, n_questions=6)
    write_sae(root, n_concepts=128, k=8, every=2)
    return root


@pytest.fixture(scope="module")
def finished_run(inputs, tiny_hf_dir, tmp_path_factory):
    """A complete unguarded run whose answer file the tests copy and tamper with."""
    out = tmp_path_factory.mktemp("probe-run")
    run(inputs, tiny_hf_dir, out)
    return out


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return target, target / "answers" / "none" / "questions.jsonl"


def no_model(monkeypatch):
    monkeypatch.setattr(generation, "load", lambda *a, **k: pytest.fail("the model was loaded"))


# --- 2. resume and duplicate answers -----------------------------------------------------------


def test_resume_refuses_a_conflicting_duplicate_naming_both_lines(
    inputs, tiny_hf_dir, finished_run, tmp_path, monkeypatch
):
    out, path = copy_run(finished_run, tmp_path / "run")
    first = json.loads(path.read_text().splitlines()[0])
    flipped = {**first, "text": "No" if first["text"] != "No" else "Yes"}
    with open(path, "a") as f:
        f.write(json.dumps(flipped) + "\n")
    before = path.read_bytes()
    no_model(monkeypatch)
    with pytest.raises(DataError) as error:
        run(inputs, tiny_hf_dir, out)
    message = str(error.value)
    assert f"{path}:7" in message and f"{path}:1" in message and "differently" in message
    assert path.read_bytes() == before  # nothing rewritten


def test_resume_collapses_an_identical_duplicate_with_a_warning(
    inputs, tiny_hf_dir, finished_run, tmp_path, monkeypatch
):
    out, path = copy_run(finished_run, tmp_path / "run")
    expected = run(inputs, tiny_hf_dir, out)["splits"]
    with open(path, "a") as f:
        f.write(path.read_text().splitlines()[2] + "\n")  # a retried write of line 3
    no_model(monkeypatch)
    with pytest.warns(UserWarning, match=r"questions.jsonl:7: repeats the answer of line 3"):
        results = run(inputs, tiny_hf_dir, out)
    assert results["splits"] == expected


# --- 3. non-finite settings and weights; empty answers -----------------------------------------

NOT_FINITE = {
    "alpha-nan": {"alpha": float("nan")},
    "steer-inf": {"steer": {3: float("inf")}},
    "steer-nan": {"steer": {3: float("nan")}},
    "steer-huge": {"steer": {3: 1e308}},
    "beta-inf": {"mode": "paper", "layer": 0, "beta": float("inf")},
    "shared-negative": {"shared_concepts": [-1]},
}


@pytest.mark.parametrize("settings", NOT_FINITE.values(), ids=NOT_FINITE)
def test_guard_refuses_non_finite_or_out_of_range_settings(
    settings, hf_model_and_processor, inputs
):
    model, _ = hf_model_and_processor
    projector = model.model.multi_modal_projector
    with pytest.raises(GuardError, match="invalid guard settings"):
        guard(model, inputs / "sae", **settings)
    assert not projector._forward_hooks  # nothing attached


def test_guard_checks_an_in_memory_sae_like_a_loaded_one(hf_model_and_processor, inputs):
    model, _ = hf_model_and_processor
    sae = load(inputs / "sae")
    with torch.no_grad():
        sae.vision_decoder.weight[0, 0] = float("nan")
    with pytest.raises(GuardError, match=r"vision_decoder.weight: 1 NaN/inf"):
        guard(model, sae)
    assert not model.model.multi_modal_projector._forward_hooks


@pytest.mark.parametrize(
    ("steer", "fragment"),
    [
        ('{"3": NaN}', "--vlsae-steer concept 3: Input should be a finite number (found nan)"),
        ("3=nan", "--vlsae-steer: expected a JSON object of concept index -> value"),
        ('{"x": 1}', "found the entry 'x': 1"),
    ],
)
def test_steer_flag_errors_say_what_is_expected(steer, fragment):
    import argparse

    parser = argparse.ArgumentParser()
    add_guard_flags(parser)
    args = parser.parse_args(["--vlsae-guard", "sae", "--vlsae-steer", steer])
    with pytest.raises(GuardFlagsError) as error:
        settings_from_args(args)
    assert fragment in str(error.value)


def test_guard_config_accepts_the_documented_ranges():
    config = GuardConfig(alpha=0.0, steer={0: -1e4, 5: 1e4}, shared_concepts=[0, 1])
    assert config.steer == {0: -1e4, 5: 1e4}


def test_results_count_empty_answers_and_warn(inputs, tiny_hf_dir, finished_run, tmp_path):
    out, path = copy_run(finished_run, tmp_path / "run")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records[:2]:
        record["text"] = ""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = run(inputs, tiny_hf_dir, out)
    assert results["splits"]["questions"]["none"]["empty"] == 2
    assert results["warnings"] == [
        "2 answers empty (questions, none): LLaVA's parser scores an empty answer as 'yes'"
    ]
    harness.finish(results, out, "test")
    assert "WARNING: 2 answers empty" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["warnings"] == results["warnings"]


# --- 4. atomic outputs -------------------------------------------------------------------------

# A write that fails part-way (a full disk, a kill): the file size limit makes the second write
# fail after its first bytes are on disk.
_PARTIAL_WRITE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
{body}
"""


def run_with_small_file_limit(body: str) -> subprocess.CompletedProcess:
    code = _PARTIAL_WRITE.format(body=textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_results_files_survive_a_write_that_fails_part_way(finished_run, tmp_path):
    out, _ = copy_run(finished_run, tmp_path / "run")
    good = {"benchmark": "pope", "note": "the previous good results"}
    write_text(out / "results.json", json.dumps(good))
    done = run_with_small_file_limit(
        f"""
        from pathlib import Path
        from vlsae_guard.harness import common
        results = {{"benchmark": "pope", "padding": "x" * 20000}}
        common.write_outputs(Path({str(out)!r}), results, [], "a run that fills the disk")
        """
    )
    assert done.returncode != 0 and "File too large" in done.stderr
    assert json.loads((out / "results.json").read_text()) == good
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_a_checkpoint_survives_a_save_that_fails_part_way(inputs, tmp_path):
    import shutil

    target = shutil.copytree(inputs / "sae", tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    done = run_with_small_file_limit(
        f"""
        import torch
        from vlsae_guard import VLSAE, SAEConfig
        VLSAE(SAEConfig(d_in=64, n_concepts=512, k=8)).save_pretrained({str(target)!r})
        """
    )
    assert done.returncode != 0 and "File too large" in done.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    load(target)  # still a valid checkpoint


# --- 5. an unwritable --out, found before the model loads --------------------------------------


def test_an_unwritable_out_is_refused_before_the_model_loads(
    inputs, tiny_hf_dir, tmp_path, monkeypatch
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    no_model(monkeypatch)
    with pytest.raises(OutputError, match=r"--out .*a-file/out: cannot write there"):
        run(inputs, tiny_hf_dir, blocker / "out")


# --- 6. a model that is not LLaVA --------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50),
        LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, vocab_size=50),
    ],
    ids=["gpt2", "llama"],
)
def test_benchmarks_refuse_a_non_llava_model_before_loading(
    config, inputs, tmp_path, monkeypatch, capsys
):
    model_dir = tmp_path / "model"
    config.save_pretrained(model_dir)
    no_model(monkeypatch)
    with pytest.raises(UnsupportedModelError, match="expected a LLaVA-family checkpoint"):
        run(inputs, model_dir, tmp_path / "out")
    script = harness_entry_point()
    argv = ["--model", str(model_dir), "--images", str(inputs / "images"), "--out", str(tmp_path)]
    assert script.main([*argv, "--questions", str(inputs / "questions.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "expected a LLaVA-family checkpoint" in err and "Traceback" not in err


def test_the_hf_backend_names_the_backend_an_original_llava_checkpoint_needs(
    inputs, tiny_llava_dir, tmp_path, monkeypatch
):
    no_model(monkeypatch)
    with pytest.raises(UnsupportedModelError, match="use --backend llava"):
        run(inputs, tiny_llava_dir, tmp_path / "out")


def harness_entry_point():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pope.py"
    spec = importlib.util.spec_from_file_location("bench_pope_entry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- 7. writers that do not resume refuse a non-empty --out ------------------------------------


def test_import_official_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    from torch import nn

    sae = {"encoder": nn.Parameter(torch.randn(12, 8))}
    for name in ("vision_decoder", "text_decoder"):
        sae |= {f"{name}.{k}": v for k, v in nn.Linear(12, 8).state_dict().items()}
    torch.save(sae, tmp_path / "sae.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["import-official", "--sae", str(tmp_path / "sae.pth"), "--out", str(out)]
    assert main([*argv, "--topk", "4"]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    with pytest.raises(OutputError):
        import_official(tmp_path / "sae.pth", out, k=4)
    assert main([*argv, "--topk", "4", "--overwrite"]) == 0
    assert load(out).config.k == 4 and (out / "notes.txt").read_text() == "mine"


def test_an_answer_file_with_records_of_another_key_is_refused(tmp_path):
    from vlsae_guard.harness.answers import AnswerLog

    path = tmp_path / "a.jsonl"
    log = AnswerLog(path, "question_id", {"x": 1})
    log.append([{"question_id": 1, "text": "yes"}])
    with open(path, "a") as f:
        f.write('{"image_id": 3}')  # no newline, no question_id
    with pytest.raises(DataError, match=r"a.jsonl:2: not an answer record"):
        AnswerLog(path, "question_id", {"x": 1})


OPTIONAL_MODULES = ("vlsae_guard.serving.model", "vlsae_guard.lmms_eval.model")


def test_every_settings_model_refuses_unknown_fields_and_non_finite_numbers():
    """Settings people write (flags, files, environment) derive from validation.Settings; the
    files the package writes back from validation.Record. Nothing else is a pydantic model."""
    import importlib
    import inspect
    import pkgutil

    from pydantic import BaseModel

    import vlsae_guard
    from vlsae_guard.validation import Record, Settings

    models = []
    for info in pkgutil.walk_packages(vlsae_guard.__path__, "vlsae_guard."):
        if info.name.endswith("__main__") or info.name in OPTIONAL_MODULES:
            continue  # the CLI's entry, and the modules that need vLLM or lmms-eval
        module = importlib.import_module(info.name)
        models += [
            m
            for m in vars(module).values()
            if inspect.isclass(m) and issubclass(m, BaseModel) and m.__module__ == module.__name__
        ]
    stray = [m.__qualname__ for m in models if not issubclass(m, Settings | Record)]
    assert models and not stray, stray
    settings = [m for m in models if issubclass(m, Settings)]
    assert {
        "TrainConfig",
        "CollectConfig",
        "RunConfig",
        "GuardConfig",
        "ServeSettings",
        "LmmsModelConfig",
        "SteerScoreConfig",
        "SteerLabConfig",
    } <= {m.__name__ for m in settings}
    assert all(m.model_config["allow_inf_nan"] is False for m in settings)
    assert all(m.model_config["extra"] == "forbid" for m in models)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_numbers_in_run_and_train_settings_are_finite(value, tmp_path):
    from pydantic import ValidationError

    from vlsae_guard.harness.config import PopeRunConfig
    from vlsae_guard.pipeline.train import TrainConfig

    with pytest.raises(ValidationError, match="finite number"):
        TrainConfig(store=tmp_path, out=tmp_path / "o", lr=value)
    with pytest.raises(ValidationError, match="finite number"):
        PopeRunConfig(model="m", out=tmp_path, temperature=value)
