"""Cue masking under vLLM (CPU): the HF guard's answers, per request, and cache-safe.

The processor reads the asked object off each prompt and puts it into the request's processor
kwargs before vLLM hashes them; these tests check that a prompt about another object of the
same image is not served the first prompt's masked projector output.
"""

from __future__ import annotations

import pytest
import torch

from vlsae_guard import guard
from vlsae_guard.lab import tiny

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("restored_environ")]
vllm = pytest.importorskip("vllm")

from vlsae_guard.serving.client import generate_offline, load_llm  # noqa: E402
from vlsae_guard.serving.settings import ServeSettings  # noqa: E402

KITE = "Is there a kite in the image?"  # its cue, the ball, is in every image (the test map)
DOG = "Is there a dog in the image?"  # no cue: the image is left as it is
IMAGES = tiny.make_images(3, seed=21)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-cue-log") / "guard.jsonl"


@pytest.fixture(scope="module")
def cue_llm(tiny_hf_dir, cue_sae_dir, log_path, vllm_case):
    settings = ServeSettings(sae=str(cue_sae_dir), guard={"mode": "cue-mask"}, log=log_path)
    llm = load_llm(str(tiny_hf_dir), settings, **vllm_case.engine)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, cue_sae_dir, vllm_case):
    """Greedy token ids per (question, guard on) and image, from the HF guard one at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_hf_dir)
    out = {}
    for on in (False, True):
        handle = guard(model, cue_sae_dir, method="cue-mask") if on else None
        try:
            for question in (KITE, DOG):
                prompt = vllm_case.template.format(question=question)
                answers = []
                for image in IMAGES:
                    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
                    with torch.no_grad():
                        ids = model.generate(**inputs, max_new_tokens=vllm_case.steps,
                                             do_sample=False)  # fmt: skip
                    answers.append(tuple(ids[0, inputs["input_ids"].shape[1] :].tolist()))
                out[question, on] = answers
        finally:
            if handle is not None:
                handle.remove()
    return out


def ask(llm, question, on, vllm_case):
    prompts = [vllm_case.template.format(question=question)] * len(IMAGES)
    answers = generate_offline(llm, IMAGES, prompts, guard=on, max_tokens=vllm_case.steps)
    return [a.token_ids for a in answers]


def test_the_masks_change_the_kite_answers_only(reference):
    assert (
        sum(a != b for a, b in zip(reference[KITE, False], reference[KITE, True], strict=True)) >= 2
    )
    assert reference[DOG, False] == reference[DOG, True]


def test_served_answers_equal_the_hf_guard_per_request_and_through_the_caches(
    cue_llm, reference, log_path, vllm_case
):
    read = vllm_case.read_log
    # the same images, asked about the kite (masked), then the dog (not), then both again
    for question, on in ((KITE, True), (DOG, True), (KITE, False), (KITE, True), (DOG, False)):
        before = len(read(log_path))
        assert ask(cue_llm, question, on, vllm_case) == reference[question, on], (question, on)
        records = read(log_path)[before:]
        if (question, on) == (DOG, True):
            # its own projector call (the asked object is in the cache key), nothing masked
            assert records and all(r["guarded_tokens"] == 0 for r in records)
        if (question, on) == (KITE, True) and before == 0:
            assert sum(r["guarded_tokens"] for r in records) > 0
