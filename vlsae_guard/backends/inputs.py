"""Model inputs for collection: load a LLaVA checkpoint with what prepares its inputs.

Collection needs, per model family, three things the guard never does: load the model with its
preprocessor, format a caption in the model's conversation template, and batch images with
prompts. :func:`load_for_collection` picks the family from ``config.json`` (the original LLaVA
names ``LlavaLlamaForCausalLM``; everything else goes through ``transformers``' auto classes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .base import UnsupportedModelError

LLAVA_1_5_TEMPLATE = "USER: <image>\n{caption} ASSISTANT:"


class Inputs:
    """Prompts and batches for one model family."""

    def image_prompt(self) -> str:
        """A prompt with one image and no text (projector site: only the image matters)."""
        raise NotImplementedError

    def caption_prompt(self, caption: str) -> str:
        """``"<image>\\n{caption}"`` as the user turn of the model's conversation template."""
        raise NotImplementedError

    def batch(self, images: list, prompts: list[str]) -> dict[str, Any]:
        """Keyword arguments of ``model(...)`` for these images and prompts, padded."""
        raise NotImplementedError

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        """Token ids of each caption alone, without special tokens."""
        raise NotImplementedError


class HFInputs(Inputs):
    """``transformers`` LLaVA / LLaVA-NeXT through the checkpoint's processor."""

    def __init__(self, processor):
        self.processor = processor
        self.image_token = getattr(processor, "image_token", "<image>")

    def image_prompt(self) -> str:
        return self.image_token

    def caption_prompt(self, caption: str) -> str:
        if getattr(self.processor, "chat_template", None):
            turn = [{"type": "image"}, {"type": "text", "text": caption}]
            return self.processor.apply_chat_template(
                [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
            )
        return LLAVA_1_5_TEMPLATE.format(caption=caption)

    def batch(self, images: list, prompts: list[str]) -> dict[str, Any]:
        return dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        return self.processor.tokenizer(captions, add_special_tokens=False).input_ids


class LlavaInputs(Inputs):
    """The original ``llava`` package: its conversation templates and image preprocessing."""

    def __init__(self, tokenizer, image_processor, model_config, conv_mode: str = "llava_v1"):
        from llava.conversation import conv_templates

        if conv_mode not in conv_templates:
            raise ValueError(f"unknown conv_mode {conv_mode!r}; known: {sorted(conv_templates)}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.conv = conv_templates[conv_mode]

    def image_prompt(self) -> str:
        return "<image>"

    def caption_prompt(self, caption: str) -> str:
        conv = self.conv.copy()
        conv.append_message(conv.roles[0], "<image>\n" + caption)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def batch(self, images: list, prompts: list[str]) -> dict[str, Any]:
        from llava.mm_utils import process_images, tokenizer_image_token

        from .original import IMAGE_TOKEN_INDEX

        ids = [tokenizer_image_token(p, self.tokenizer, IMAGE_TOKEN_INDEX) for p in prompts]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, seq in enumerate(ids):  # right padding; the model re-pads as it is configured
            input_ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        pixels = process_images(images, self.image_processor, self.model_config)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "images": pixels,
            "image_sizes": [img.size for img in images],
        }

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer(captions, add_special_tokens=False).input_ids


def read_model_config(model_id: str) -> dict[str, Any]:
    """``config.json`` of a local folder or a Hub repo (through the Hub cache)."""
    local = Path(model_id)
    if local.is_dir():
        file = local / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(model_id, "config.json"))
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable model config ({e})") from e


def num_layers(config: dict[str, Any]) -> int | None:
    """Decoder layers of the language model, from ``config.json`` (before loading weights)."""
    text = config.get("text_config") or config
    return text.get("num_hidden_layers")


def is_original_llava(config: dict[str, Any]) -> bool:
    return "LlavaLlamaForCausalLM" in (config.get("architectures") or []) or (
        "mm_vision_tower" in config
    )


# transformers' LLaVA classes the guard attaches to, by architecture and by model_type.
HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
HF_MODEL_TYPES = ("llava", "llava_next")
Family = Literal["hf", "llava"]


def checkpoint_family(config: dict[str, Any], where: str) -> Family:
    """``"hf"`` (llava-hf layout) or ``"llava"`` (the original package) from ``config.json``,
    read before any weights load; any other model is an :class:`UnsupportedModelError`."""
    if is_original_llava(config):
        return "llava"
    archs = config.get("architectures") or []
    if any(a in HF_ARCHITECTURES for a in archs) or config.get("model_type") in HF_MODEL_TYPES:
        return "hf"
    raise UnsupportedModelError(
        f"{where}: architectures {archs} (model_type {config.get('model_type')!r}): expected a "
        f"LLaVA-family checkpoint ({', '.join(HF_ARCHITECTURES)}, or the original llava "
        "package's LlavaLlamaForCausalLM)"
    )


def load_for_collection(
    model_id: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    conv_mode: str = "llava_v1",
) -> tuple[nn.Module, Inputs]:
    """(model in eval mode on ``device``/``dtype``, its :class:`Inputs`)."""
    if checkpoint_family(read_model_config(model_id), f"{model_id}/config.json") == "llava":
        from transformers import AutoTokenizer

        from ._llava_compat import ensure_llava_importable

        ensure_llava_importable()
        from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

        model = LlavaLlamaForCausalLM.from_pretrained(model_id, dtype=dtype)
        tower = model.get_vision_tower()
        if not tower.is_loaded:
            tower.load_model()
        model = model.to(device=device, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        return model, LlavaInputs(tokenizer, tower.image_processor, model.config, conv_mode)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
    model = model.to(device).eval()
    return model, HFInputs(AutoProcessor.from_pretrained(model_id))


def move(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; floating-point ones (pixels) also to the model's dtype."""

    def convert(value):
        if isinstance(value, Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {k: convert(v) for k, v in batch.items()}
