"""Batched generation on a LLaVA model, one class per backend, with the guard optional.

Both backends pad on the left, so a batch gives the same greedy answers as one question at a
time (tested), and both build LLaVA-1.5's evaluation prompt by default: the ``vicuna_v1``
conversation ``"{system} USER: <image>\\n{prompt} ASSISTANT:"`` that ``llava/eval`` uses, which is
what published numbers were produced with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

# LLaVA's conv_vicuna_v1 system prompt (llava/conversation.py), used by its eval scripts.
LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT_FORMATS = ("llava", "chat-template")
BACKENDS = ("hf", "llava", "vllm", "openai")
NOT_YET = "not available yet: needs the vLLM integration (issue 6)"


class BackendUnavailable(RuntimeError):
    """The backend was named but cannot run here (not implemented yet, or not installed)."""


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}
        out = {"do_sample": True, "temperature": self.temperature, "num_beams": 1}
        if self.top_p is not None:
            out["top_p"] = self.top_p
        return {**out, "max_new_tokens": self.max_new_tokens}

    def describe(self) -> dict:
        kind = "greedy" if self.temperature <= 0 else "sampling"
        return {"strategy": kind, **self.kwargs()}


def llava_conversation(prompt: str) -> str:
    """LLaVA-1.5's eval prompt (``conv_templates["vicuna_v1"]`` with one image)."""
    return f"{LLAVA_SYSTEM} USER: <image>\n{prompt} ASSISTANT:"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class Generator:
    """A loaded model that answers (image, prompt) pairs; ``model`` is what gets guarded."""

    backend: str
    model: torch.nn.Module

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], decoding: Decoding, runner=None
    ) -> list[str]:
        """Answers to ``prompts`` (the user's text; the conversation is added here)."""
        raise NotImplementedError

    def full_prompt(self, prompt: str) -> str:
        raise NotImplementedError


class HFGenerator(Generator):
    """transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``."""

    backend = "hf"

    def __init__(self, model_id: str, dtype: torch.dtype, device: str, prompt_format: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_id)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
        self.model.to(device).eval()
        self.device, self.dtype, self.prompt_format = device, dtype, prompt_format

    def full_prompt(self, prompt: str) -> str:
        if self.prompt_format == "llava":
            return llava_conversation(prompt)
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, images, prompts, decoding, runner=None):
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        inputs = self.processor(
            images=list(images),
            text=[self.full_prompt(p) for p in prompts],
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = (runner or self.model.generate)(**inputs, pad_token_id=pad, **decoding.kwargs())
        new = ids[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


class LlavaGenerator(Generator):
    """The original LLaVA code (``llava`` package), loaded as ``llava/eval`` loads LLaVA-1.5.

    Like ``load_pretrained_model`` for a LLaVA checkpoint, but in the requested dtype (the
    builder always casts to float16) and with left padding for batches.
    """

    backend = "llava"

    def __init__(self, model_path: str, dtype: torch.dtype, device: str, conv_mode: str):
        from transformers import AutoTokenizer

        from ..backends._llava_compat import ensure_llava_importable

        ensure_llava_importable()
        from llava import constants
        from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, dtype=dtype)
        config = model.config
        if getattr(config, "mm_use_im_patch_token", False):
            tokenizer.add_tokens([constants.DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
        if getattr(config, "mm_use_im_start_end", False):
            tokenizer.add_tokens(
                [constants.DEFAULT_IM_START_TOKEN, constants.DEFAULT_IM_END_TOKEN],
                special_tokens=True,
            )
        if len(tokenizer) != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        tower = model.get_vision_tower()
        if not tower.is_loaded:
            tower.load_model()
        model.to(device=device, dtype=dtype).eval()
        self.model, self.tokenizer = model, tokenizer
        self.image_processor = tower.image_processor
        self.device, self.dtype, self.conv_mode = device, dtype, conv_mode

    def full_prompt(self, prompt: str) -> str:
        from llava import constants
        from llava.conversation import conv_templates

        image = constants.DEFAULT_IMAGE_TOKEN
        if getattr(self.model.config, "mm_use_im_start_end", False):
            image = constants.DEFAULT_IM_START_TOKEN + image + constants.DEFAULT_IM_END_TOKEN
        conv = conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], f"{image}\n{prompt}")
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    @torch.no_grad()
    def generate(self, images, prompts, decoding, runner=None):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        tok = self.tokenizer
        ids = [
            tokenizer_image_token(self.full_prompt(p), tok, IMAGE_TOKEN_INDEX, return_tensors="pt")
            for p in prompts
        ]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
        width = max(len(i) for i in ids)
        input_ids = torch.stack([torch.cat([i.new_full((width - len(i),), pad), i]) for i in ids])
        mask = torch.stack([torch.arange(width) >= width - len(i) for i in ids]).long()
        pixels = process_images(list(images), self.image_processor, self.model.config)
        if isinstance(pixels, list):
            pixels = [p.to(self.device, self.dtype) for p in pixels]
        else:
            pixels = pixels.to(self.device, self.dtype)
        with _left_padding(self.model.config):
            out = (runner or self.model.generate)(
                inputs=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                images=pixels,
                image_sizes=[im.size for im in images],
                pad_token_id=pad,
                use_cache=True,
                **decoding.kwargs(),
            )
        # Generation from inputs_embeds returns only the new tokens.
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


@contextlib.contextmanager
def _left_padding(config):
    """LLaVA re-pads the spliced embeddings on ``tokenizer_padding_side`` (right in LLaVA-1.5
    checkpoints, which only suits batch size 1); left keeps every row's last token last."""
    previous = getattr(config, "tokenizer_padding_side", "right")
    config.tokenizer_padding_side = "left"
    try:
        yield
    finally:
        config.tokenizer_padding_side = previous


def load(
    backend: str, model: str, dtype: str = "auto", device: str | None = None,
    prompt_format: str = "llava",
) -> Generator:  # fmt: skip
    """Load ``model`` (a directory or Hub id) for ``backend``."""
    if backend in ("vllm", "openai"):
        raise BackendUnavailable(f"backend {backend!r} is {NOT_YET}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    if backend == "hf":
        return HFGenerator(model, torch_dtype, device, prompt_format)
    if backend == "llava":
        if prompt_format != "llava":
            raise BackendUnavailable("backend 'llava' builds LLaVA's own conversation prompt only")
        return LlavaGenerator(model, torch_dtype, device, "vicuna_v1")
    raise BackendUnavailable(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
