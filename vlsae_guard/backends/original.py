"""The original LLaVA code (``llava`` package, PyPI ``llava-torch``): ``LlavaLlamaForCausalLM``.

The projector is ``model.get_model().mm_projector`` (an ``nn.Sequential``); images are spliced
where ``input_ids == IMAGE_TOKEN_INDEX`` (-200) inside ``prepare_inputs_labels_for_multimodal``,
which ``generate`` calls before any module runs, so that method is where the prompt is seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import Backend, Prompt, PromptSink

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

    def capture_prompt(self, sink: PromptSink) -> Callable[[], None]:
        model = self.model
        had_own = _PREPARE in vars(model)
        original = getattr(model, _PREPARE)

        def prepare(
            input_ids,
            position_ids,
            attention_mask,
            past_key_values,
            labels,
            images,
            image_sizes=None,
        ):
            if images is not None and input_ids is not None and input_ids.shape[1] > 1:
                sink(
                    Prompt(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        image_mask=input_ids == IMAGE_TOKEN_INDEX,
                        image_groups=_groups(images),
                    )
                )
            return original(
                input_ids,
                position_ids,
                attention_mask,
                past_key_values,
                labels,
                images,
                image_sizes,
            )

        setattr(model, _PREPARE, prepare)

        def undo() -> None:
            if had_own:
                setattr(model, _PREPARE, original)
            else:
                delattr(model, _PREPARE)

        return undo

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
