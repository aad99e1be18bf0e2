"""What every model family implements, in two small interfaces.

* :class:`Backend` wraps a loaded model: where the projector, the language model and its decoder
  layers are, and where image features go in a prompt. It never does math on features; it tells
  the guard where projected image rows come from, so
  :class:`vlsae_guard.core.intervention.ProjectorIntervention` is shared by all families.
* :class:`Inputs` holds the family's preprocessors: its prompts (collection and generation), its
  batches, and batched left-padded generation. :class:`LoadedModel` pairs it with the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

Family = Literal["hf", "llava"]  # transformers' LLaVA classes, or the original llava package
# How an image becomes the vision tower's square: "pad" centres it on a square of the
# processor's mean colour first (LLaVA-1.5's expand2square, image_aspect_ratio "pad"); "crop"
# resizes its shortest side and crops the centre (CLIP's preprocessing, the official VL-SAE
# scripts'). None: what the checkpoint's own config and processor do.
ImageAspect = Literal["pad", "crop"]
IMAGE_ASPECTS: tuple[ImageAspect, ...] = ("pad", "crop")


class UnsupportedModelError(TypeError):
    """The model is not a LLaVA-family model the guard knows how to attach to."""


@dataclass
class Prompt:
    """What the guard needs to know about a batch before its images are projected."""

    input_ids: Tensor  # (batch, seq)
    attention_mask: Tensor | None
    image_mask: Tensor  # (batch, seq) bool: placeholder positions of image features
    image_groups: list[int] | None = None  # projector rows per image, in batch order

    def images_per_sample(self) -> Tensor:
        """Count images per sample as the number of contiguous placeholder runs."""
        starts = self.image_mask.clone()
        starts[:, 1:] &= ~self.image_mask[:, :-1]
        return starts.sum(-1)

    def text_positions(self) -> Tensor:
        """Positions holding real text: not an image placeholder, not padding."""
        keep = ~self.image_mask
        if self.attention_mask is not None:
            keep &= self.attention_mask.bool()
        return keep


PromptSink = Callable[[Prompt], None]
# Receives (image_mask, attention_mask) in the language model's sequence coordinates.
LayoutSink = Callable[[Tensor, Tensor | None], None]


def wrap_method(obj: object, name: str, make: Callable) -> Callable[[], None]:
    """Shadow ``obj.name`` with ``make(original)`` on this instance only; returns the undo.

    Used where no module hook fires early enough (e.g. ``generate`` encodes images before the
    first forward). The undo restores the instance exactly, own attribute or not.
    """
    had_own = name in vars(obj)
    original = getattr(obj, name)
    setattr(obj, name, make(original))

    def undo() -> None:
        if had_own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)

    return undo


class Backend:
    """Base class; subclasses implement ``matches``, ``projector`` and ``capture_prompt``."""

    name: str = "base"

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def projector(self) -> nn.Module:
        raise NotImplementedError

    def capture_prompt(self, sink: PromptSink) -> Callable[[], None]:
        """Arrange for ``sink`` to see each prompt before its images are projected.

        Returns a function that undoes exactly what was arranged.
        """
        raise NotImplementedError

    def capture_layout(self, sink: LayoutSink) -> Callable[[], None]:
        """Like :meth:`capture_prompt`, in the language model's coordinates (paper mode).

        Where placeholders are expanded before the model runs (transformers), both agree.
        """
        return self.capture_prompt(lambda p: sink(p.image_mask, p.attention_mask))

    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def prompt_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """generate()'s model inputs as the forward of the prompt takes them (fused decoding).

        transformers' models take them as they are; a family that splices images before its
        forward returns the spliced ``inputs_embeds`` and their attention mask instead.
        """
        return inputs

    pixel_key: str = "pixel_values"  # generate()'s image input: its pixels (a tensor or list)

    def image_token_id(self) -> int:
        """The id that marks where image features go in the prompt's ``input_ids``."""
        raise NotImplementedError

    def without_images(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """generate()'s model inputs for the same prompts without their images (the text-only
        arm of M3ID and PAI): image placeholders dropped, rows left-padded again, pixels and
        image sizes removed; everything else in each row unchanged."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        keep = (ids != self.image_token_id()) & mask.bool()
        if (keep == mask.bool()).all():
            raise ValueError("the prompts hold no image placeholder: the text-only arm is arm a")
        width = int(keep.sum(1).max())
        pad = int(ids[~mask.bool()][0]) if (~mask.bool()).any() else 0
        new_ids = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros_like(new_ids, dtype=mask.dtype)
        for row, kept in enumerate(keep):
            tokens = ids[row, kept]
            new_ids[row, width - len(tokens) :] = tokens
            new_mask[row, width - len(tokens) :] = 1
        image_inputs = {self.pixel_key, "image_sizes", "pixel_values", "position_ids"}
        rest = {k: v for k, v in inputs.items() if k not in image_inputs}
        return {**rest, "input_ids": new_ids, "attention_mask": new_mask}

    def _language_model_part(self, name: str, kind: type, what: str):
        """``language_model().name`` (or ``.model.name``), an instance of ``kind``."""
        lm = self.language_model()
        for owner in (lm, getattr(lm, "model", None)):
            part = getattr(owner, name, None)
            if isinstance(part, kind):
                return part
        raise UnsupportedModelError(f"{self.name}: cannot find the {what}")

    def decoder_layers(self) -> nn.ModuleList:
        return self._language_model_part("layers", nn.ModuleList, "decoder layers")

    def final_norm(self) -> nn.Module:
        """The language model's norm after its last decoder layer, before the output head."""
        return self._language_model_part("norm", nn.Module, "final norm")

    def output_head(self) -> nn.Module:
        """The head that maps the final hidden states to logits (``lm_head``)."""
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Module):
            raise UnsupportedModelError(f"{self.name}: the model has no output head")
        return head

    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def rows_per_sample(self, prompt: Prompt, n_rows: int, tokens_per_row: int) -> Tensor:
        """Projector rows (images or crops) that each sample owns, in batch order."""
        per_sample = self.images_per_sample(prompt, tokens_per_row)
        if prompt.image_groups is None:
            counts = per_sample
        else:
            groups = torch.tensor(prompt.image_groups)
            ends = per_sample.cumsum(0)
            if int(ends[-1]) != len(groups):
                raise ValueError(
                    f"{len(groups)} images were given but the prompts hold {int(ends[-1])}"
                )
            cum = torch.cat([torch.zeros(1, dtype=groups.dtype), groups.cumsum(0)])
            counts = cum[ends] - cum[ends - per_sample]
        if int(counts.sum()) != n_rows:
            raise ValueError(
                f"{self.name}: the projector produced {n_rows} image rows but the prompts "
                f"account for {int(counts.sum())}"
            )
        return counts

    def images_per_sample(self, prompt: Prompt, tokens_per_row: int) -> Tensor:
        """Images per sample; by default the number of placeholder runs."""
        return prompt.images_per_sample()

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def vision_tower(self) -> nn.Module:
        """The image encoder (CLIP's vision transformer) whose features the projector reads."""
        raise NotImplementedError

    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers (``vision_tower:L`` is layer L's output)."""
        for name, module in self.vision_tower().named_modules():
            if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
                return module
        raise UnsupportedModelError(f"{self.name}: cannot find the vision encoder's layers")

    def vision_feature_layer(self) -> int:
        """The last vision layer whose output the projector reads (LLaVA's
        ``vision_feature_layer``, an index into the encoder's hidden states: 0 is the embeddings,
        i the output of layer i - 1)."""
        return read_vision_layer(self._vision_select_layer(), len(self.vision_layers()))

    def _vision_select_layer(self) -> int | list[int]:
        raise NotImplementedError

    def vision_width(self) -> int:
        """Width of the vision encoder's hidden states (its layers' LayerNorm width)."""
        norms = [m for m in self.vision_layers()[0].modules() if isinstance(m, nn.LayerNorm)]
        if not norms:
            raise UnsupportedModelError(f"{self.name}: the vision layers have no LayerNorm")
        return norms[0].normalized_shape[-1]

    def out_features(self) -> int:
        """Width of the projector output, read from its last linear layer."""
        linears = [m for m in self.projector().modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UnsupportedModelError(f"{self.name}: the projector has no linear layer")
        return linears[-1].out_features


class Inputs:
    """One family's prompts, batches and decoding; built from preprocessors alone, so a caller
    holding a model and its processor (tests, notebooks) needs no loader."""

    family: Family

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

    def question_prompt(self, question: str) -> str:
        """The full generation prompt around the user's ``question`` and one image."""
        raise NotImplementedError

    def generate(
        self,
        model: nn.Module,
        images: Sequence,
        questions: Sequence[str],
        generate_kwargs: dict[str, Any],
        runner: Callable | None = None,
    ) -> list[str]:
        """Answers to ``questions`` (the user's text), one left-padded batch, so a batch answers
        as each question alone would. ``runner`` (default ``model.generate``) is what a guard
        handle wraps; ``generate_kwargs`` are ``generate``'s decoding arguments."""
        raise NotImplementedError


class LoadedModel(NamedTuple):
    """A model in eval mode with its family's :class:`Inputs` (unpacks as ``model, inputs``)."""

    model: nn.Module
    inputs: Inputs

    def generate(self, images, questions, generate_kwargs, runner=None) -> list[str]:
        """See :meth:`Inputs.generate`."""
        return self.inputs.generate(self.model, images, questions, generate_kwargs, runner)


def read_vision_layer(select: int | Sequence[int], n_layers: int) -> int:
    """The last vision layer whose output a LLaVA model reads, from its ``vision_feature_layer``
    (one hidden-state index or several; -2 of 24 layers: layer 22)."""
    indices = list(select) if isinstance(select, Sequence) else [select]
    return max(i % (n_layers + 1) for i in indices) - 1


def vision_tower_shape(hf_config) -> tuple[int, int]:
    """From a LLaVA config alone: the vision tower's width, and the last vision layer whose
    output the model reads (for checks made before a model is built: ``serve``, vLLM)."""
    vision = hf_config.vision_config
    return vision.hidden_size, read_vision_layer(
        hf_config.vision_feature_layer, vision.num_hidden_layers
    )


def move(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; floating-point ones (pixels) also to the model's dtype."""

    def convert(value):
        if isinstance(value, Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {k: convert(v) for k, v in batch.items()}


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first parameter: where its inputs go."""
    param = next(model.parameters())
    return param.device, param.dtype


def pad_to_square(image, mean: Sequence[float]):
    """LLaVA-1.5's ``expand2square``: a PIL image centred on a square of colour ``mean``
    (the processor's ``image_mean``, in [0, 1]); square images are returned as they are."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def check_image_aspect(image_aspect: str | None, anyres: bool, where: str) -> None:
    """Refuse an unknown aspect, or any for an anyres model (its crops are its own)."""
    if image_aspect is None:
        return
    if image_aspect not in IMAGE_ASPECTS:
        raise ValueError(f"image_aspect {image_aspect!r}: expected one of {IMAGE_ASPECTS} or None")
    if anyres:
        raise ValueError(
            f"image_aspect={image_aspect!r}: {where} tiles images at several resolutions "
            "(anyres); pad and crop apply to single-square models such as LLaVA-1.5"
        )
