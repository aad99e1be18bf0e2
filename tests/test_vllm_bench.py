"""benchmarks/pope.py with ``--backend vllm``: one offline engine answers both arms, and its
answers are the hf backend's, word for word (fp32, greedy), at another batch size."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

from _pope import run, texts, write_inputs  # noqa: E402

from vlsae_guard.harness import pope  # noqa: E402


@pytest.fixture
def environment():
    """The vllm backend writes VLSAE_GUARD_* for its engine processes; put them back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_vllm_backend_answers_both_arms_as_the_hf_backend(
    tiny_hf_dir, tiny_images, tmp_path, environment, vllm_case
):
    # What the runner sets itself (--dtype, --seed) is refused in --engine-args.
    engine_args = {k: v for k, v in vllm_case.engine.items() if k not in ("dtype", "seed")}
    inputs = write_inputs(tmp_path / "inputs", tiny_images, n_questions=12)
    guard = ["--sae", str(vllm_case.sae_dir), "--ab", "--vlsae-alpha", str(vllm_case.alpha)]
    steps = ["--max-new-tokens", "8"]
    hf = run(inputs, tiny_hf_dir, tmp_path / "hf", *guard, *steps, "--batch-size", "1")
    engine = ["--engine-args", json.dumps(engine_args), "--batch-size", "5"]
    out = tmp_path / "vllm"
    results = run(inputs, tiny_hf_dir, out, *guard, *steps, *engine, backend="vllm", device=None)

    reference = {arm: texts(tmp_path / "hf", arm) for arm in ("none", "vlsae")}
    assert reference["none"] != reference["vlsae"]  # the guard changes answers: the check can fail
    for arm in ("none", "vlsae"):
        assert texts(out, arm) == reference[arm], arm
        assert results["splits"]["questions"][arm] == hf["splits"]["questions"][arm]
    settings = results["settings"]
    assert settings["backend"] == "vllm" and settings["engine_args"] == engine_args
    assert settings["sae_sha256"] == hf["settings"]["sae_sha256"]
    sidecar = json.loads((out / "answers" / "vlsae" / "questions.settings.json").read_text())
    assert sidecar["engine_args"] == engine_args and sidecar["guard"]["alpha"] == vllm_case.alpha
    pope.finish(results, out, "POPE on vLLM")  # the plot's dependencies are in this environment
    assert (out / "results.png").stat().st_size > 0
