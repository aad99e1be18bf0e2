"""The small interface every backend implements: find the projector, know the image positions.

A backend never does math on features; it tells the guard where projected image rows come
from so :class:`vlsae_guard.core.intervention.ProjectorIntervention` can be shared by all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


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

    def decoder_layers(self) -> nn.ModuleList:
        lm = self.language_model()
        for owner in (lm, getattr(lm, "model", None)):
            layers = getattr(owner, "layers", None)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise UnsupportedModelError(f"{self.name}: cannot find the decoder layers")

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

    def out_features(self) -> int:
        """Width of the projector output, read from its last linear layer."""
        linears = [m for m in self.projector().modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UnsupportedModelError(f"{self.name}: the projector has no linear layer")
        return linears[-1].out_features
