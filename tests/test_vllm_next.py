"""The plugin on LLaVA-NeXT: anyres crops, a variable number per image, mixed in one batch."""

from __future__ import annotations

import os

import pytest

from vlsae_guard.lab import tiny

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

from vlsae_guard.serving.client import generate_offline, load_llm  # noqa: E402
from vlsae_guard.serving.settings import ServeSettings  # noqa: E402

# Square-ish images get 5 crops (base + 2x2), very wide or tall ones 3 (base + 1x2 / 2x1).
IMAGES = (
    tiny.make_images(2, seed=11, size=(40, 32))
    + tiny.make_images(2, seed=12, size=(84, 20))
    + tiny.make_images(1, seed=13, size=(20, 84))
)
FLAGS = [True, False, True, False, False]


@pytest.fixture(scope="module")
def setup(tiny_next_dir, tmp_path_factory, vllm_case):
    saved = dict(os.environ)
    log = tmp_path_factory.mktemp("vllm-next-log") / "guard.jsonl"
    reference = vllm_case.hf_reference(tiny_next_dir, IMAGES)
    settings = ServeSettings(sae=str(vllm_case.sae_dir), guard={"alpha": vllm_case.alpha}, log=log)
    llm = load_llm(str(tiny_next_dir), settings, **{**vllm_case.engine, "max_model_len": 1024})
    yield llm, reference, log
    llm.llm_engine.engine_core.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def ask(llm, guard, case):
    prompts = [case.prompt] * len(IMAGES)
    answers = generate_offline(llm, IMAGES, prompts, guard=guard, max_tokens=case.steps)
    return [a.token_ids for a in answers]


def test_mixed_crops_and_switches_equal_the_hf_guard(setup, vllm_case):
    llm, reference, log = setup
    tokens_per_image = vllm_case.tokens_per_image
    assert vllm_case.differs(reference) >= 3
    assert ask(llm, FLAGS, vllm_case) == [reference[on][i] for i, on in enumerate(FLAGS)]
    records = vllm_case.read_log(log)
    assert [f for r in records for f in r["flags"]] == FLAGS  # every image, in order, once
    crops = crops_per_image(llm)
    assert len(set(crops)) > 1  # images with different numbers of crops
    assert [r["crops"] for r in records] == [
        sum(crops[i] for i in range(start, start + r["images"]))
        for start, r in zip(_starts(records), records, strict=True)
    ]
    for r in records:
        assert r["tokens"] == r["crops"] * tokens_per_image
    assert sum(r["guarded_tokens"] for r in records) == tokens_per_image * sum(
        c for c, on in zip(crops, FLAGS, strict=True) if on
    )
    mixed = [r for r in records if 0 < sum(r["flags"]) < len(r["flags"])]
    assert any(r["images"] < r["crops"] for r in mixed), records


def crops_per_image(llm) -> list[int]:
    """Projector rows per image: the anyres crops plus the base image, as transformers counts."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = llm.llm_engine.model_config.hf_config
    size = config.vision_config.image_size
    return [
        image_size_to_num_patches((im.height, im.width), config.image_grid_pinpoints, size)
        for im in IMAGES
    ]


def _starts(records: list[dict]) -> list[int]:
    starts, at = [], 0
    for r in records:
        starts.append(at)
        at += r["images"]
    return starts


def test_uniform_switches_equal_the_hf_guard(setup, vllm_case):
    llm, reference, _ = setup
    assert ask(llm, True, vllm_case) == reference[True]
    assert ask(llm, False, vllm_case) == reference[False]
