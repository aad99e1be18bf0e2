"""Hugging Face transformers: ``LlavaForConditionalGeneration`` and LLaVA-NeXT.

transformers 5.x keeps the projector at ``model.model.multi_modal_projector``; older releases
had ``model.multi_modal_projector``. Both are found. Image features are spliced at positions
where ``input_ids == config.image_token_id``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .base import Backend, Prompt, PromptSink


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

    def capture_prompt(self, sink: PromptSink) -> Callable[[], None]:
        token_id = _image_token_id(self.model)

        def pre_hook(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if kwargs.get("pixel_values") is None or input_ids is None:
                return None
            sizes = kwargs.get("image_sizes")
            sink(
                Prompt(
                    input_ids=input_ids,
                    attention_mask=kwargs.get("attention_mask"),
                    image_mask=input_ids == token_id,
                    image_groups=self.image_groups(sizes) if sizes is not None else None,
                )
            )
            return None

        handle = self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return handle.remove

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
    are counted as placeholder runs, the base class's rule (prompts must put text between
    consecutive images).
    """

    name = "hf-llava-next"

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
