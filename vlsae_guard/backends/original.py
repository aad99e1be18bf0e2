"""The original LLaVA code (``llava`` package, PyPI ``llava-torch``): ``LlavaLlamaForCausalLM``.

The projector is ``model.get_model().mm_projector`` (an ``nn.Sequential``); images are spliced
where ``input_ids == IMAGE_TOKEN_INDEX`` (-200) inside ``prepare_inputs_labels_for_multimodal``,
which ``generate`` calls before any module runs, so that method is where the prompt is seen.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import Backend, LayoutSink, Prompt, PromptSink, wrap_method

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX, fixed by the original code
_PREPARE = "prepare_inputs_labels_for_multimodal"


class OriginalLlava(Backend):
    name = "llava"

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
