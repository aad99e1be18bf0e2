"""The original LLaVA code (``llava`` package, PyPI ``llava-torch``): ``LlavaLlamaForCausalLM``.

The projector is ``model.get_model().mm_projector`` (an ``nn.Sequential``); images are spliced
where ``input_ids == IMAGE_TOKEN_INDEX`` (-200) inside ``prepare_inputs_labels_for_multimodal``,
which ``generate`` calls before any module runs, so that method is where the prompt is seen.
:func:`load` loads a checkpoint as ``llava/eval`` does; :class:`LlavaInputs` builds its
conversation prompts and batches with the package's own helpers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ._llava_compat import ensure_llava_importable
from .base import (
    Backend,
    ImageAspect,
    Inputs,
    LayoutSink,
    LoadedModel,
    Prompt,
    PromptSink,
    check_image_aspect,
    move,
    placement,
    wrap_method,
)

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX, fixed by the original code
_PREPARE = "prepare_inputs_labels_for_multimodal"


class OriginalLlava(Backend):
    name = "llava"
    pixel_key = "images"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        get_model = getattr(model, "get_model", None)
        if not callable(get_model) or not callable(getattr(model, _PREPARE, None)):
            return False
        return isinstance(getattr(get_model(), "mm_projector", None), nn.Module)

    def projector(self) -> nn.Module:
        return self.model.get_model().mm_projector

    def language_model(self) -> nn.Module:
        return self.model.get_model()

    def vision_tower(self) -> nn.Module:
        return self.model.get_vision_tower()

    def _vision_select_layer(self) -> int:
        return self.model.get_vision_tower().select_layer

    def image_token_id(self) -> int:
        return IMAGE_TOKEN_INDEX

    def capture_prompt(self, sink: PromptSink) -> Callable[[], None]:
        def before(input_ids, attention_mask, images) -> None:
            sink(
                Prompt(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    image_mask=input_ids == IMAGE_TOKEN_INDEX,
                    image_groups=_groups(images),
                )
            )

        return self._wrap_prepare(before=before)

    def capture_layout(self, sink: LayoutSink) -> Callable[[], None]:
        def after(input_ids, attention_mask, outputs) -> None:
            new_mask, embeds = outputs[2], outputs[4]
            if embeds is not None:
                sink(
                    _image_positions(input_ids, attention_mask, new_mask, embeds.shape[1]), new_mask
                )

        return self._wrap_prepare(after=after)

    def _wrap_prepare(self, before=None, after=None) -> Callable[[], None]:
        """Wrap the instance's prepare method (the only place the prompt is visible)."""

        def make(original):
            signature = inspect.signature(original)

            def prepare(*args, **kwargs):
                call = signature.bind(*args, **kwargs).arguments
                ids, mask, images = call["input_ids"], call["attention_mask"], call["images"]
                active = images is not None and ids is not None and ids.shape[1] > 1
                if active and before:
                    before(ids, mask, images)
                outputs = original(*args, **kwargs)
                if active and after:
                    after(ids, mask, outputs)
                return outputs

            return prepare

        return wrap_method(self.model, _PREPARE, make)

    def prompt_inputs(self, inputs: dict) -> dict:
        # As the package's generate(): images spliced (or text embedded) before the forward.
        inputs = dict(inputs)
        ids, images = inputs.pop("input_ids"), inputs.pop("images", None)
        sizes, mask = inputs.pop("image_sizes", None), inputs.pop("attention_mask", None)
        position = inputs.pop("position_ids", None)
        if images is None:
            embeds = self.model.get_model().embed_tokens(ids)
        else:
            _, position, mask, _, embeds, _ = getattr(self.model, _PREPARE)(
                ids, position, mask, None, None, images, image_sizes=sizes
            )
        return {**inputs, "inputs_embeds": embeds, "attention_mask": mask, "position_ids": position}

    def images_per_sample(self, prompt: Prompt, tokens_per_row: int) -> Tensor:
        # One placeholder token per image; the original code hands a text-only sample one image
        # row too (it consumes and discards it), so such a sample owns one group.
        return prompt.image_mask.sum(-1).clamp_min(1)

    def embed(self, input_ids: Tensor) -> Tensor:
        # Placeholders (-200) are no vocabulary ids; callers pass only text positions.
        return self.model.get_model().embed_tokens(input_ids)


def _groups(images) -> list[int] | None:
    """Projector rows per image: crops of anyres inputs, else one row per image."""
    if isinstance(images, list):
        return [x.shape[0] if x.ndim == 4 else 1 for x in images]
    if torch.is_tensor(images) and images.ndim == 5:
        return [images.shape[1]] * images.shape[0]
    return None


def _image_positions(input_ids: Tensor, attention_mask, new_mask, length: int) -> Tensor:
    """Where prepare_inputs_labels_for_multimodal put the image features of each sample.

    It drops padding, replaces each -200 with the image's rows, then pads again (right, or left
    when the config says so); images of one sample are assumed to be equally long.
    """
    batch = input_ids.shape[0]
    out = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
    for i in range(batch):
        ids = input_ids[i] if attention_mask is None else input_ids[i][attention_mask[i].bool()]
        slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        valid = new_mask[i].nonzero().flatten() if new_mask is not None else torch.arange(length)
        if not slots or not len(valid):
            continue
        per_image = (len(valid) - (len(ids) - len(slots))) // len(slots)
        start = int(valid[0])
        for j, slot in enumerate(slots):
            first = start + slot + j * (per_image - 1)
            out[i, first : first + per_image] = True
    return out


def load(
    model_path: str,
    dtype: torch.dtype,
    device: str | torch.device,
    conv_mode: str = "llava_v1",
    image_aspect: ImageAspect | None = None,
) -> LoadedModel:
    """Load a checkpoint as ``llava.model.builder.load_pretrained_model`` does, in ``dtype``.

    As the builder: the slow tokenizer, the image-patch and start/end tokens the config asks
    for (``mm_use_im_patch_token``, default true; ``mm_use_im_start_end``), the embeddings
    resized to the tokenizer, the vision tower loaded and cast. Unlike it: any dtype (it always
    casts to float16) and no ``device_map``.
    """
    from transformers import AutoTokenizer

    ensure_llava_importable()
    from llava import constants
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(model_path, dtype=dtype)
    config = model.config
    if getattr(config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens([constants.DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
    if getattr(config, "mm_use_im_start_end", False):
        tokenizer.add_tokens(
            [constants.DEFAULT_IM_START_TOKEN, constants.DEFAULT_IM_END_TOKEN], special_tokens=True
        )
    if len(tokenizer) != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    # Cast the tower only (it loads in float32): casting the whole model would also round the
    # rotary embedding's float32 buffers, which the builder keeps, and change the logits.
    tower.to(device=device, dtype=dtype)
    model = model.to(device).eval()
    inputs = LlavaInputs(tokenizer, tower.image_processor, config, conv_mode, image_aspect)
    return LoadedModel(model, inputs)


class LlavaInputs(Inputs):
    """The ``llava`` package's conversation templates, tokenizer and image preprocessing.

    Collection and generation share one prompt: the ``conv_mode`` conversation with the image
    (wrapped in start/end tokens when ``mm_use_im_start_end``) and the text as the user turn.
    Images go through ``process_images`` as the config's ``image_aspect_ratio`` says (LLaVA-1.5:
    ``pad``), or as ``image_aspect`` says (:data:`~vlsae_guard.backends.base.ImageAspect`).
    """

    family = "llava"

    def __init__(
        self,
        tokenizer,
        image_processor,
        model_config,
        conv_mode: str = "llava_v1",
        image_aspect: ImageAspect | None = None,
    ):
        ensure_llava_importable()
        from llava.conversation import conv_templates

        if conv_mode not in conv_templates:
            raise ValueError(f"unknown conv_mode {conv_mode!r}; known: {sorted(conv_templates)}")
        own = str(getattr(model_config, "image_aspect_ratio", None))
        check_image_aspect(image_aspect, "anyres" in own, f"this model (image_aspect_ratio {own})")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.image_aspect = image_aspect
        # What process_images reads: the config's aspect, or "pad" / anything else (a crop).
        self.image_config = (
            model_config
            if image_aspect is None
            else SimpleNamespace(image_aspect_ratio=image_aspect)
        )
        self.conv = conv_templates[conv_mode]
        pads = (tokenizer.pad_token_id, tokenizer.unk_token_id, 0)
        self.pad_id = next(p for p in pads if p is not None)

    def image_prompt(self) -> str:
        return "<image>"

    def caption_prompt(self, caption: str) -> str:
        return self.question_prompt(caption)

    def question_prompt(self, question: str) -> str:
        from llava import constants

        image = constants.DEFAULT_IMAGE_TOKEN
        if getattr(self.model_config, "mm_use_im_start_end", False):
            image = constants.DEFAULT_IM_START_TOKEN + image + constants.DEFAULT_IM_END_TOKEN
        conv = self.conv.copy()
        conv.append_message(conv.roles[0], f"{image}\n{question}")
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def batch(self, images: list, prompts: list[str], left: bool = False) -> dict:
        """Right-padded by default: the model re-pads as its config says (see :func:`load`)."""
        from llava.mm_utils import process_images, tokenizer_image_token

        ids = [tokenizer_image_token(p, self.tokenizer, IMAGE_TOKEN_INDEX) for p in prompts]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, seq in enumerate(ids):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            input_ids[i, span] = torch.tensor(seq)
            mask[i, span] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "images": process_images(images, self.image_processor, self.image_config),
            "image_sizes": [img.size for img in images],
        }

    def caption_ids(self, captions: list[str]) -> list[list[int]]:
        return self.tokenizer(captions, add_special_tokens=False).input_ids

    @torch.no_grad()
    def generate(self, model, images, questions, generate_kwargs, runner=None):
        prompts = [self.question_prompt(q) for q in questions]
        batch = move(self.batch(list(images), prompts, left=True), *placement(model))
        with _left_padding(model.config):
            out = (runner or model.generate)(
                inputs=batch.pop("input_ids"),
                **batch,
                pad_token_id=self.pad_id,
                use_cache=True,
                **generate_kwargs,
            )
        # Generation from inputs_embeds returns only the new tokens.
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


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
