"""One home per model family: transformers' LLaVA / LLaVA-NeXT (:mod:`.hf`) and the original
``llava`` package (:mod:`.original`). Each owns loading, its prompts and batches, batched
generation, and where the projector and layers are; :mod:`.families` picks the family."""

from __future__ import annotations

from ._llava_compat import ensure_llava_importable
from .base import (
    IMAGE_ASPECTS,
    Backend,
    Family,
    ImageAspect,
    Inputs,
    LoadedModel,
    Prompt,
    UnsupportedModelError,
    move,
)
from .families import (
    BACKENDS,
    checkpoint_family,
    detect,
    load,
    num_layers,
    num_vision_layers,
    read_model_config,
    resolve_dtype,
)

__all__ = [
    "BACKENDS",
    "IMAGE_ASPECTS",
    "ImageAspect",
    "Backend",
    "Family",
    "Inputs",
    "LoadedModel",
    "Prompt",
    "UnsupportedModelError",
    "checkpoint_family",
    "detect",
    "ensure_llava_importable",
    "load",
    "move",
    "num_layers",
    "num_vision_layers",
    "read_model_config",
    "resolve_dtype",
]
