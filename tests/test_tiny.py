"""The tiny checkpoints behave like the real ones: layouts, loading, generation, tokenizer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlsae_guard.lab import tiny

PROMPT = "USER: <image>\nIs there a dog in the image? ASSISTANT:"
PROMPTS = [
    PROMPT,
    "USER: <image>\nDescribe the image. ASSISTANT:",
    "USER: <image>\nWhat color is the large object in the image? ASSISTANT:",
    "USER: <image>\nIs there a red circle? ASSISTANT:",
]
HUB_PREFIXES = (
    "language_model.model.",
    "language_model.lm_head.",
    "multi_modal_projector.",
    "vision_tower.vision_model.",
)


def _greedy(model, inputs, n=8):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_like_llava_hf(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.build_tokenizer(tmp_path))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        "USER: <image>\nHi? ASSISTANT:"
    )
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert tok.unk_token_id not in tok("Xylophones zoom 42 times!").input_ids  # char fallback
    assert (
        tok.decode(ids, skip_special_tokens=True)
        == "USER:\n Is there a dog in the image? ASSISTANT:"
    )
    batch = tok(["a dog", "a red cat is here"], padding=True).input_ids
    assert tok.padding_side == "left" and batch[0][0] == tok.pad_token_id


# --- llava-hf layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_hf_dir", "tiny_next_dir"])
def test_hf_checkpoint_uses_hub_key_layout(which, request):
    keys = set(load_file(request.getfixturevalue(which) / "model.safetensors"))
    assert "language_model.lm_head.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert not any(k.startswith(("vision_tower.encoder", "model.", "lm_head")) for k in keys)
    extra = {"image_newline"} if which == "tiny_next_dir" else set()
    assert {k for k in keys if not k.startswith(HUB_PREFIXES)} == extra


@pytest.mark.parametrize("next_", [False, True], ids=["llava", "next"])
def test_hf_loads_without_missing_keys_and_same_weights(next_, request):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    directory = request.getfixturevalue("tiny_next_dir" if next_ else "tiny_hf_dir")
    cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    saved = load_file(directory / "model.safetensors")
    loaded = {tiny.hub_key(k): v for k, v in model.state_dict().items()}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_build_is_deterministic(tmp_path, tiny_hf_dir):
    again = load_file(tiny.build_hf_llava(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(tiny.build_hf_llava(tmp_path / "other", seed=1) / "model.safetensors")
    first = load_file(tiny_hf_dir / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    key = "multi_modal_projector.linear_1.weight"
    assert not torch.equal(first[key], other[key])


def test_processor_expands_image_token(
    hf_model_and_processor, next_model_and_processor, tiny_images
):
    model, processor = hf_model_and_processor
    inputs = processor(images=tiny_images[:1], text=[PROMPT], return_tensors="pt")
    n_image = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_image == tiny.TinySizes().image_seq_length == model.config.image_seq_length
    model, processor = next_model_and_processor
    inputs = processor(images=tiny_images[:1], text=[PROMPT], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() > n_image  # anyres


# --- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["hf_model_and_processor", "next_model_and_processor"])
def test_batched_left_padded_generation_matches_single(fixture, request, tiny_images):
    model, processor = request.getfixturevalue(fixture)
    batch = processor(images=tiny_images, text=PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: really padded
    together = _greedy(model, batch)
    alone = [
        _greedy(model, processor(images=[image], text=[prompt], return_tensors="pt"))[0]
        for image, prompt in zip(tiny_images, PROMPTS, strict=True)
    ]
    assert together == alone


@pytest.mark.parametrize("fixture", ["hf_model_and_processor", "next_model_and_processor"])
def test_generation_depends_on_the_image(fixture, request, tiny_images):
    model, processor = request.getfixturevalue(fixture)
    inputs = processor(images=tiny_images, text=[PROMPT] * len(tiny_images), return_tensors="pt")
    answers = _greedy(model, inputs)
    assert len({tuple(a) for a in answers}) == len(tiny_images)
    assert any(len(set(a)) > 1 for a in answers)  # not one token repeated
    text = processor.batch_decode(answers, skip_special_tokens=True)
    assert all(t.strip() for t in text)


# --- original LLaVA ----------------------------------------------------------------------------


def test_original_checkpoint_layout(tiny_llava_dir, tiny_hf_dir):
    lm = load_file(tiny_llava_dir / "model.safetensors")
    tower = load_file(tiny_llava_dir / tiny.VISION_TOWER_SUBDIR / "model.safetensors")
    hf = load_file(tiny_hf_dir / "model.safetensors")
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight"} <= set(lm)
    assert not any("vision" in k for k in lm)  # the frozen tower lives in its own checkpoint
    assert all(k.startswith("vision_model.") for k in tower)
    # Same seed, same weights as the llava-hf checkpoint.
    assert torch.equal(
        lm["model.layers.1.mlp.up_proj.weight"],
        hf["language_model.model.layers.1.mlp.up_proj.weight"],
    )
    assert torch.equal(
        lm["model.mm_projector.2.weight"], hf["multi_modal_projector.linear_2.weight"]
    )
    fc1 = "encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(tower[f"vision_model.{fc1}"], hf[f"vision_tower.vision_model.{fc1}"])


@pytest.mark.llava
def test_original_load_pretrained_model(tiny_llava_dir, llava_model_and_tokenizer):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, context_len = load_pretrained_model(
        str(tiny_llava_dir), None, "llava-tiny", device="cpu", device_map="cpu"
    )
    assert type(model).__name__ == "LlavaLlamaForCausalLM" and model.dtype == torch.float16
    assert len(tokenizer) == model.config.vocab_size and context_len == 2048
    assert image_processor.crop_size["height"] == tiny.TinySizes().image_size


@pytest.mark.llava
def test_original_loads_without_missing_keys(tiny_llava_dir, llava_model_and_tokenizer):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from transformers import CLIPVisionModel

    _, info = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tower_dir = tiny_llava_dir / tiny.VISION_TOWER_SUBDIR
    _, info = CLIPVisionModel.from_pretrained(tower_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _original_inputs(model, tokenizer, image):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token

    ids = tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    pixels = process_images([image], model.get_vision_tower().image_processor, model.config)
    return ids.unsqueeze(0), pixels


@pytest.mark.llava
def test_original_generate(llava_model_and_tokenizer, tiny_images):
    model, tokenizer = llava_model_and_tokenizer
    answers = []
    for image in tiny_images:
        ids, pixels = _original_inputs(model, tokenizer, image)
        with torch.no_grad():
            out = model.generate(
                inputs=ids,
                images=pixels,
                image_sizes=[image.size],
                max_new_tokens=5,
                do_sample=False,
            )
        assert out.shape == (1, 5)  # inputs_embeds generation returns only the new tokens
        answers.append(tuple(out[0].tolist()))
    assert len(set(answers)) > 1


@pytest.mark.llava
def test_original_matches_hf_on_square_images(llava_model_and_tokenizer, hf_model_and_processor):
    """Same weights, same pixels (no crop/pad on a square image at the model's size)."""
    model, tokenizer = llava_model_and_tokenizer
    hf_model, processor = hf_model_and_processor
    side = tiny.TinySizes().image_size
    for image in tiny.make_images(2, seed=3, size=(side, side)):
        ids, pixels = _original_inputs(model, tokenizer, image)
        inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
        with torch.no_grad():
            # output_hidden_states first: without the compat shim it corrupts later CLIP features.
            model(input_ids=ids, images=pixels, output_hidden_states=True)
            original = model(input_ids=ids, images=pixels).logits
            reference = hf_model(**inputs).logits
        torch.testing.assert_close(original, reference, rtol=1e-5, atol=1e-5)
