"""Backend glue, one module per place LLaVA runs; :func:`detect` picks the right one."""

from __future__ import annotations

from torch import nn

from .base import Backend, Prompt, UnsupportedModelError
from .hf import HFLlava, HFLlavaNext
from .original import OriginalLlava

BACKENDS: tuple[type[Backend], ...] = (HFLlavaNext, HFLlava, OriginalLlava)


def detect(model: nn.Module) -> Backend:
    """The backend for ``model``, or a clear error saying what was expected."""
    for backend in BACKENDS:
        if backend.matches(model):
            return backend(model)
    raise UnsupportedModelError(
        f"cannot guard a {type(model).__name__}: expected a LLaVA-family model with a multimodal "
        "projector (transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration "
        "with `multi_modal_projector`, or the original llava package's LlavaLlamaForCausalLM with "
        "`get_model().mm_projector`)"
    )


__all__ = ["BACKENDS", "Backend", "Prompt", "UnsupportedModelError", "detect"]
