"""``image_aspect``: pad to a square (LLaVA-1.5's expand2square) or CLIP's centre crop (the
official VL-SAE scripts'), for both families; None keeps what the checkpoint does."""

from __future__ import annotations

import pytest
import torch

from vlsae_guard import backends
from vlsae_guard.backends.hf import HFInputs

PROMPT = "Is there a dog?"


@pytest.fixture(scope="module")
def hf_pixels(hf_model_and_processor, tiny_images):
    """{image_aspect: pixel_values of the tiny (non-square) images} through HFInputs.batch."""
    processor = hf_model_and_processor[1]
    out = {}
    for aspect in (None, "pad", "crop"):
        inputs = HFInputs(processor, image_aspect=aspect)
        out[aspect] = inputs.batch(tiny_images, [inputs.question_prompt(PROMPT)] * 4)
    return {aspect: batch["pixel_values"] for aspect, batch in out.items()}


@pytest.fixture(scope="module")
def llava_inputs(llava_model_and_tokenizer, tiny_llava_dir):
    from vlsae_guard.backends.original import LlavaInputs

    model, tokenizer = llava_model_and_tokenizer
    processor = model.get_vision_tower().image_processor
    return {
        aspect: LlavaInputs(tokenizer, processor, model.config, image_aspect=aspect)
        for aspect in (None, "pad", "crop")
    }


def test_hf_pad_and_crop_differ_and_none_is_the_processors_crop(hf_model_and_processor, hf_pixels):
    processor = hf_model_and_processor[1]
    before = processor.image_processor.to_dict()
    assert not torch.equal(hf_pixels["pad"], hf_pixels["crop"])
    assert hf_pixels["pad"].shape == hf_pixels["crop"].shape
    assert torch.equal(hf_pixels[None], hf_pixels["crop"])  # llava-hf's CLIP processor crops
    assert processor.image_processor.to_dict() == before  # options apply to a copy


def test_hf_generation_gets_the_same_pixels_as_batch(
    hf_model_and_processor, tiny_images, hf_pixels
):
    processor = hf_model_and_processor[1]
    seen = {}

    def runner(**kwargs):
        seen["pixels"] = kwargs["pixel_values"]
        return kwargs["input_ids"]

    for aspect in ("pad", "crop"):
        HFInputs(processor, image_aspect=aspect).generate(
            torch.nn.Linear(1, 1), tiny_images, [PROMPT] * 4, {}, runner
        )
        assert torch.equal(seen["pixels"], hf_pixels[aspect])


def test_hf_pad_is_transformers_llava_padding(hf_model_and_processor, tiny_images, hf_pixels):
    """Our square equals LlavaImageProcessor's own do_pad (the same processor otherwise)."""
    from transformers import LlavaImageProcessor

    clip = hf_model_and_processor[1].image_processor
    keep = ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor")
    padding = LlavaImageProcessor(do_pad=True, **{k: getattr(clip, k) for k in keep})
    assert torch.equal(padding(tiny_images, return_tensors="pt")["pixel_values"], hf_pixels["pad"])


@pytest.mark.llava
def test_original_pad_and_crop_differ_and_none_is_the_configs_pad(llava_inputs, tiny_images):
    pixels = {
        aspect: inputs.batch(tiny_images, [inputs.question_prompt(PROMPT)] * 4)["images"]
        for aspect, inputs in llava_inputs.items()
    }
    assert not torch.equal(pixels["pad"], pixels["crop"])
    assert llava_inputs[None].model_config.image_aspect_ratio == "pad"
    assert torch.equal(pixels[None], pixels["pad"])


@pytest.mark.llava
def test_both_families_pad_and_crop_alike(llava_inputs, tiny_images, hf_pixels):
    """The tiny checkpoints share their image processor's settings, so each option must give
    both families the same pixels (llava's own expand2square against ours)."""
    for aspect in ("pad", "crop"):
        inputs = llava_inputs[aspect]
        images = inputs.batch(tiny_images, [inputs.question_prompt(PROMPT)] * 4)["images"]
        assert torch.equal(images, hf_pixels[aspect])


def test_anyres_and_unknown_aspects_are_refused(next_model_and_processor, hf_model_and_processor):
    with pytest.raises(ValueError, match="LLaVA-NeXT tiles images"):
        HFInputs(next_model_and_processor[1], image_aspect="crop")
    HFInputs(next_model_and_processor[1])  # its own anyres preprocessing: fine
    with pytest.raises(ValueError, match=r"image_aspect 'square': expected one of \('pad', 'crop'"):
        HFInputs(hf_model_and_processor[1], image_aspect="square")


def test_load_takes_the_option(tiny_hf_dir):
    loaded = backends.load(str(tiny_hf_dir), torch.float32, "cpu", image_aspect="pad")
    assert loaded.inputs.image_aspect == "pad"
    assert backends.load(str(tiny_hf_dir), torch.float32, "cpu").inputs.image_aspect is None


def test_the_harness_loader_passes_it_to_local_backends_only(tiny_hf_dir):
    from vlsae_guard.harness import generation

    loaded = generation.load("hf", str(tiny_hf_dir), "float32", "cpu", image_aspect="crop")
    assert loaded.loaded.inputs.image_aspect == "crop"
    with pytest.raises(generation.BackendUnavailable, match="applies to --backend hf and llava"):
        generation.load("vllm", str(tiny_hf_dir), image_aspect="crop")
