"""Hugging Face transformers: ``LlavaForConditionalGeneration`` and LLaVA-NeXT.

transformers 5.x keeps the projector at ``model.model.multi_modal_projector``; older releases
had ``model.multi_modal_projector``. Both are found. Image features are spliced at positions
where ``input_ids == config.image_token_id``. Loading, prompts and batches go through the
checkpoint's own processor (:class:`HFInputs`).

Generation builds LLaVA-1.5's evaluation prompt by default: the ``vicuna_v1`` conversation
``"{system} USER: <image>\\n{prompt} ASSISTANT:"`` that ``llava/eval`` uses, which is what
published numbers were produced with; ``chat-template`` applies the checkpoint's template.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import (
    Backend,
    ImageAspect,
    Inputs,
    LayoutSink,
    LoadedModel,
    Prompt,
    PromptSink,
    check_image_aspect,
    pad_to_square,
    placement,
    wrap_method,
)

# LLaVA's conv_vicuna_v1 system prompt (llava/conversation.py), used by its eval scripts.
LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT_FORMATS = ("llava", "chat-template")
# Collection's prompt for a processor without a chat template (LLaVA-1.5's user turn).
LLAVA_1_5_TEMPLATE = "USER: <image>\n{caption} ASSISTANT:"


def _find(model: nn.Module, name: str):
    for owner in (getattr(model, "model", None), model):
        if owner is not None and isinstance(getattr(owner, name, None), nn.Module | nn.Parameter):
            return getattr(owner, name)
    return None


def _image_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return None


class HFLlava(Backend):
    name = "hf-llava"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return (
            _find(model, "multi_modal_projector") is not None and _image_token_id(model) is not None
        )

    def projector(self) -> nn.Module:
        return _find(self.model, "multi_modal_projector")

    def language_model(self) -> nn.Module:
        return _find(self.model, "language_model")

    def vision_tower(self) -> nn.Module:
        return _find(self.model, "vision_tower")

    def _vision_select_layer(self) -> int | list[int]:
        return self.model.config.vision_feature_layer

    def image_token_id(self) -> int:
        return _image_token_id(self.model)

    def capture_prompt(self, sink: PromptSink) -> Callable[[], None]:
        # The projector runs inside forward() when it is given pixel_values, but generate()
        # (transformers >= 5) encodes the images before its first forward: catch both.
        def on_call(args, kwargs) -> None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if kwargs.get("pixel_values") is not None and torch.is_tensor(input_ids):
                sink(self._prompt(input_ids, kwargs))

        def make(original):
            def generate(*args, **kwargs):
                on_call(args, kwargs)
                return original(*args, **kwargs)

            return generate

        hook = self.model.register_forward_pre_hook(
            lambda module, args, kwargs: on_call(args, kwargs), with_kwargs=True
        )
        undo_generate = wrap_method(self.model, "generate", make)

        def undo() -> None:
            hook.remove()
            undo_generate()

        return undo

    def capture_layout(self, sink: LayoutSink) -> Callable[[], None]:
        # Every forward that splices image features (given as pixels or pre-encoded) is a
        # prompt, or a re-run of the whole sequence, in the language model's coordinates.
        def pre_hook(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            spliced = kwargs.get("pixel_values") is not None or kwargs.get("mm_encoder_outputs")
            if spliced and torch.is_tensor(input_ids):
                prompt = self._prompt(input_ids, kwargs)
                sink(prompt.image_mask, prompt.attention_mask)

        return self.model.register_forward_pre_hook(pre_hook, with_kwargs=True).remove

    def _prompt(self, input_ids: Tensor, kwargs: dict) -> Prompt:
        sizes = kwargs.get("image_sizes")
        return Prompt(
            input_ids=input_ids,
            attention_mask=kwargs.get("attention_mask"),
            image_mask=input_ids == _image_token_id(self.model),
            image_groups=self.image_groups(sizes) if sizes is not None else None,
        )

    def image_groups(self, image_sizes) -> list[int] | None:
        """Projector rows per image: one per image for LLaVA-1.5 (image_sizes is informational)."""
        return None

    def images_per_sample(self, prompt: Prompt, tokens_per_row: int):
        # Every image is exactly one projector row of placeholders, so counting is exact even
        # for images written back to back (which would merge into one run).
        return prompt.image_mask.sum(-1) // tokens_per_row


class HFLlavaNext(HFLlava):
    """LLaVA-NeXT: the projector sees every anyres crop; image-newline tokens are not its output.

    After unpadding, an image's placeholder count is no multiple of the crop size, so images
    are counted as placeholder runs (prompts must put text between consecutive images).
    """

    name = "hf-llava-next"

    def images_per_sample(self, prompt: Prompt, tokens_per_row: int):
        return prompt.images_per_sample()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return super().matches(model) and _find(model, "image_newline") is not None

    def image_groups(self, image_sizes) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        return [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for size in image_sizes
        ]


def llava_conversation(prompt: str) -> str:
    """LLaVA-1.5's eval prompt (``conv_templates["vicuna_v1"]`` with one image)."""
    return f"{LLAVA_SYSTEM} USER: <image>\n{prompt} ASSISTANT:"


def chat_template_prompt(processor, text: str) -> str:
    """``text`` after one image as the user turn of the processor's chat template."""
    turn = [{"type": "image"}, {"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
    )


def hf_prompt(processor, prompt_format: str, prompt: str) -> str:
    """The full prompt for an llava-hf checkpoint: LLaVA's eval conversation or its template."""
    if prompt_format == "llava":
        return llava_conversation(prompt)
    return chat_template_prompt(processor, prompt)


class HFInputs(Inputs):
    """``transformers`` LLaVA / LLaVA-NeXT through the checkpoint's processor.

    Collection follows the checkpoint's chat template (LLaVA-1.5's user turn without one);
    generation follows ``prompt_format`` (:data:`PROMPT_FORMATS`). ``image_aspect``
    (:data:`~vlsae_guard.backends.base.ImageAspect`) overrides the processor's pad-or-crop on a
    copy of it; None keeps what it does (llava-hf's LLaVA-1.5: CLIP's centre crop).
    """

    family = "hf"

    def __init__(
        self, processor, prompt_format: str = "llava", image_aspect: ImageAspect | None = None
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format {prompt_format!r}: expected one of {PROMPT_FORMATS}")
        images = processor.image_processor
        check_image_aspect(image_aspect, hasattr(images, "image_grid_pinpoints"), "LLaVA-NeXT")
        if image_aspect is not None:
            processor, images = copy.copy(processor), copy.deepcopy(images)
            processor.image_processor = images
            # LlavaImageProcessor's own padding off (pad squares the image beforehand).
            for attr, value in (("do_pad", False), ("do_center_crop", True)):
                if hasattr(images, attr):
                    setattr(images, attr, value)
        self.processor = processor
        self.prompt_format = prompt_format
        self.image_aspect = image_aspect
        self.image_token = getattr(processor, "image_token", "<image>")

    def images(self, images) -> list:
        """``images`` as the processor gets them: squared first for ``image_aspect="pad"``."""
        if self.image_aspect != "pad":
            return list(images)
        return [pad_to_square(image, self.processor.image_processor.image_mean) for image in images]

    def image_prompt(self) -> str:
        return self.image_token

    def caption_prompt(self, caption: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return chat_template_prompt(self.processor, caption)
        return LLAVA_1_5_TEMPLATE.format(caption=caption)

    def batch(self, images: list, prompts: list[str]) -> dict:
        images = self.images(images)
        return dict(self.processor(images=images, text=prompts, return_tensors="pt", padding=True))

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        return self.processor.tokenizer(captions, add_special_tokens=False).input_ids

    def question_prompt(self, question: str) -> str:
        return hf_prompt(self.processor, self.prompt_format, question)

    @torch.no_grad()
    def generate(self, model, images, questions, generate_kwargs, runner=None):
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        device, dtype = placement(model)
        inputs = self.processor(
            images=self.images(images),
            text=[self.question_prompt(q) for q in questions],
            return_tensors="pt",
            padding=True,
        ).to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = (runner or model.generate)(**inputs, pad_token_id=pad, **generate_kwargs)
        new = ids[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def load(
    model_id: str,
    dtype: torch.dtype,
    device: str | torch.device,
    prompt_format: str = "llava",
    image_aspect: ImageAspect | None = None,
) -> LoadedModel:
    """The checkpoint through transformers' auto classes, in eval mode on ``device``/``dtype``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    inputs = HFInputs(AutoProcessor.from_pretrained(model_id), prompt_format, image_aspect)
    model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
    return LoadedModel(model.to(device).eval(), inputs)
