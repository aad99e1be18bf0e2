"""patches/*.patch apply to the original LLaVA eval scripts, and the patched scripts run.

Users of haotian-liu/LLaVA A/B the guard with their own ``llava/eval`` scripts, so the patches
must keep applying exactly (no fuzz, no offsets) to those sources, here the installed
``llava-torch`` (the same files), and the patched scripts must run unguarded, guarded and in
paper mode off-GPU (``--device cpu``) on the tiny checkpoint, recording the guard settings
in every answer line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vlsae_guard import VLSAE, GuardConfig, SAEConfig

pytestmark = pytest.mark.llava

PATCHES = Path(__file__).resolve().parent.parent / "patches"
SCRIPTS = ["model_vqa_loader", "model_vqa"]
QUESTIONS = ["Is there a dog in the image?", "What color is the large object?"]
FLAGS = {
    "plain": (),
    # alpha 1.0 replaces every image token by its shared-concept reconstruction: answers change.
    "guarded": ("--vlsae-alpha", "1.0"),
    "paper": ("--vlsae-mode", "paper", "--vlsae-layer", "1"),
}
# The runs the tests read. They are mostly interpreter start-up and imports, so they all start
# at once, one thread each, and each test waits for its own.
RUNS = [(s, "plain") for s in SCRIPTS] + [(s, "guarded") for s in SCRIPTS]
RUNS += [("model_vqa_loader", "paper")]


def _apply(patch: Path, root: Path) -> None:
    """Apply ``patch`` in ``root`` with patch(1), else git apply; fail on fuzz or offsets."""
    if shutil.which("patch"):
        cmd = ["patch", "-p1", "--batch", "--forward", "-i", str(patch)]
    elif shutil.which("git"):
        cmd = ["git", "apply", "-p1", "--verbose", str(patch)]
    else:
        pytest.skip("neither `patch` nor `git` is installed: cannot apply the patches")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{patch.name} does not apply:\n{log}"
    assert "fuzz" not in log and "offset" not in log, f"{patch.name} applies inexactly:\n{log}"


@pytest.fixture(scope="module")
def patched_llava(tmp_path_factory) -> Path:
    """A copy of the installed ``llava`` package with every patch applied; goes on PYTHONPATH."""
    pytest.importorskip("llava", reason="original LLaVA not installed (requirements/llava.txt)")
    for module in ("shortuuid", "requests"):  # imported by the eval scripts / llava.utils only
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the llava eval scripts need `{module}`, which is not installed")
    source = Path(importlib.util.find_spec("llava").submodule_search_locations[0])
    root = tmp_path_factory.mktemp("llava-patched")
    shutil.copytree(source, root / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    for script in SCRIPTS:
        _apply(PATCHES / f"{script}.patch", root)
    return root


@dataclass
class Data:
    model: Path
    images: Path
    questions: Path
    sae: Path


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_llava_dir, tiny_images) -> Data:
    """Question file and images in the scripts' format, and a guard SAE for the tiny model."""
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    with open(root / "questions.jsonl", "w") as f:
        for i, text in enumerate(QUESTIONS):
            tiny_images[i].save(root / "images" / f"{i}.png")
            f.write(json.dumps({"question_id": i, "image": f"{i}.png", "text": text}) + "\n")
    torch.manual_seed(0)
    sae = VLSAE(SAEConfig(d_in=64, n_concepts=128, k=8, shared_concepts=list(range(0, 128, 3))))
    sae.save_pretrained(root / "sae")
    return Data(tiny_llava_dir, root / "images", root / "questions.jsonl", root / "sae")


@pytest.fixture(scope="module")
def answers(patched_llava, data, tmp_path_factory):
    """Start every run in :data:`RUNS`; ``answers(script, mode)`` waits for one, -> its lines."""
    out_dir = tmp_path_factory.mktemp("answers")
    # The patched copy first, so `-m llava.eval...` runs it rather than site-packages'.
    path = [str(patched_llava), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    started = {}
    for script, mode in RUNS:
        name = f"{script}-{mode}"
        answers_file = out_dir / f"{name}.jsonl"
        guard = ("--vlsae-guard", str(data.sae), *FLAGS[mode]) if FLAGS[mode] else ()
        cmd = [
            sys.executable, "-m", f"llava.eval.{script}",
            "--model-path", str(data.model), "--image-folder", str(data.images),
            "--question-file", str(data.questions), "--answers-file", str(answers_file),
            "--device", "cpu", "--temperature", "0", "--conv-mode", "llava_v1",
            "--max_new_tokens", "4", *guard,
        ]  # fmt: skip
        with open(out_dir / f"{name}.log", "w") as log:  # a file: a pipe nobody reads can fill
            proc = subprocess.Popen(cmd, cwd=out_dir, env=env, stdout=log, stderr=log)
        started[script, mode] = (proc, cmd, out_dir / name)

    def wait(script: str, mode: str) -> list[dict]:
        proc, cmd, stem = started[script, mode]
        proc.wait(timeout=300)
        output = stem.with_suffix(".log").read_text()
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
        return [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines()]

    yield wait
    for proc, _, _ in started.values():  # a failed test may leave runs behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check(lines: list[dict], guard: GuardConfig | None, sae: Path | None) -> list[str]:
    """Every question answered, in order, with the guard recorded; returns the answer texts."""
    assert [line["question_id"] for line in lines] == list(range(len(QUESTIONS)))
    expected = {
        "vlsae_guard": None if guard is None else guard.model_dump(mode="json"),
        "vlsae_sae": None if sae is None else str(sae),
    }
    assert all(line["metadata"] == expected for line in lines)
    return [line["text"] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_patched_script_with_and_without_guard(answers, data, script):
    plain = _check(answers(script, "plain"), None, None)
    guarded = _check(answers(script, "guarded"), GuardConfig(alpha=1.0), data.sae)
    assert all(plain) and all(guarded)
    assert guarded != plain


def _reference(data: Data, **settings) -> tuple[list[str], list[str]]:
    """What the patched loader must answer in paper mode, computed here: (fused, unfused).

    Same loading, prompt and generate arguments as the script, on one thread like the runs.
    Unfused is ``model.generate`` with the hooks attached, what a patch that skipped
    ``handle.generate`` would produce; the two differ, so the comparison can tell them apart.
    """
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    from vlsae_guard import guard
    from vlsae_guard.backends import ensure_llava_importable

    ensure_llava_importable()
    path = str(data.model)
    tokenizer, model, processor, _ = load_pretrained_model(
        path, None, get_model_name_from_path(path), device="cpu"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fused, unfused = [], []
    try:
        with guard(model, data.sae, **settings) as handle, torch.inference_mode():
            for line in map(json.loads, data.questions.read_text().splitlines()):
                conv = conv_templates["llava_v1"].copy()
                conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + line["text"])
                conv.append_message(conv.roles[1], None)
                ids = tokenizer_image_token(
                    conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt"
                )[None]
                image = Image.open(data.images / line["image"]).convert("RGB")
                pixels = process_images([image], processor, model.config).to(model.dtype)
                kwargs = dict(
                    images=pixels,
                    image_sizes=(image.size,),  # a tuple, as the loader's collate_fn makes it
                    do_sample=False,
                    temperature=0.0,
                    top_p=None,
                    num_beams=1,
                    max_new_tokens=4,
                    use_cache=True,
                )
                for out, generate in ((fused, handle.generate), (unfused, model.generate)):
                    ids_out = generate(ids, **kwargs)
                    out.append(tokenizer.batch_decode(ids_out, skip_special_tokens=True)[0].strip())
    finally:
        torch.set_num_threads(threads)
    return fused, unfused


@pytest.mark.slow
def test_patched_loader_paper_mode(answers, data):
    """Paper mode must go through ``handle.generate``: its logit fusion is the method."""
    plain = _check(answers("model_vqa_loader", "plain"), None, None)
    paper = _check(
        answers("model_vqa_loader", "paper"), GuardConfig(mode="paper", layer=1), data.sae
    )
    fused, unfused = _reference(data, mode="paper", layer=1)
    assert fused != unfused
    assert paper == fused
    assert paper != plain


@pytest.mark.parametrize("script", SCRIPTS)
def test_patched_script_refuses_bad_guard_flags_before_loading(patched_llava, data, script):
    """Invalid --vlsae-* settings are argparse's usage error (exit 2, no traceback), raised
    before the model loads: the model path here does not even exist."""
    path = [str(patched_llava), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    cmd = [
        sys.executable, "-m", f"llava.eval.{script}", "--model-path", "no/such/model",
        "--question-file", str(data.questions), "--vlsae-guard", str(data.sae),
        "--vlsae-steer", "3=nan",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--vlsae-steer: expected a JSON object" in done.stderr
    assert "Traceback" not in done.stderr
