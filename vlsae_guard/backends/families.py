"""Which family a model or checkpoint belongs to, and loading one through its family.

A checkpoint's family is read from ``config.json`` before any weights load (the original LLaVA
names ``LlavaLlamaForCausalLM``; llava-hf checkpoints name transformers' LLaVA classes); a loaded
model's :class:`~.base.Backend` is found from its modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hf, original
from .base import Backend, Family, ImageAspect, LoadedModel, UnsupportedModelError
from .hf import HFLlava, HFLlavaNext
from .original import OriginalLlava

BACKENDS: tuple[type[Backend], ...] = (HFLlavaNext, HFLlava, OriginalLlava)
# transformers' LLaVA classes the guard attaches to, by architecture and by model_type.
HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
HF_MODEL_TYPES = ("llava", "llava_next")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def read_model_config(model_id: str) -> dict[str, Any]:
    """``config.json`` of a local folder or a Hub repo (through the Hub cache)."""
    local = Path(model_id)
    if local.is_dir():
        file = local / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(model_id, "config.json"))
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable model config ({e})") from e


def num_layers(config: dict[str, Any]) -> int | None:
    """Decoder layers of the language model, from ``config.json`` (before loading weights)."""
    text = config.get("text_config") or config
    return text.get("num_hidden_layers")


def num_vision_layers(config: dict[str, Any]) -> int | None:
    """Layers of the vision encoder, from a llava-hf ``config.json`` (None where it does not say:
    the original llava package names its tower by Hub id)."""
    return (config.get("vision_config") or {}).get("num_hidden_layers")


def is_original_llava(config: dict[str, Any]) -> bool:
    return "LlavaLlamaForCausalLM" in (config.get("architectures") or []) or (
        "mm_vision_tower" in config
    )


def checkpoint_family(config: dict[str, Any], where: str) -> Family:
    """``"hf"`` (llava-hf layout) or ``"llava"`` (the original package) from ``config.json``,
    read before any weights load; any other model is an :class:`UnsupportedModelError`."""
    if is_original_llava(config):
        return "llava"
    archs = config.get("architectures") or []
    if any(a in HF_ARCHITECTURES for a in archs) or config.get("model_type") in HF_MODEL_TYPES:
        return "hf"
    raise UnsupportedModelError(
        f"{where}: architectures {archs} (model_type {config.get('model_type')!r}): expected a "
        f"LLaVA-family checkpoint ({', '.join(HF_ARCHITECTURES)}, or the original llava "
        "package's LlavaLlamaForCausalLM)"
    )


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A ``--dtype`` name as a torch dtype; ``auto`` is float16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load(
    model_id: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    family: Family | None = None,
    prompt_format: str = "llava",
    conv_mode: str = "llava_v1",
    image_aspect: ImageAspect | None = None,
) -> LoadedModel:
    """``model_id`` (a folder or Hub id) in eval mode on ``device``/``dtype``, with its inputs.

    ``family`` defaults to the checkpoint's (:func:`checkpoint_family`). Generation prompts:
    ``prompt_format`` for ``hf`` (``llava`` or ``chat-template``); ``conv_mode``, a
    ``llava.conversation`` template, for ``llava`` (which builds no other format).
    ``image_aspect``: ``"pad"`` to a square or CLIP's centre ``"crop"``
    (:data:`~vlsae_guard.backends.base.ImageAspect`); None: what the checkpoint does (the
    original LLaVA-1.5 pads, llava-hf's processor crops).
    """
    if family is None:
        family = checkpoint_family(read_model_config(model_id), f"{model_id}/config.json")
    if family == "hf":
        return hf.load(model_id, dtype, device, prompt_format, image_aspect)
    if family != "llava":
        raise ValueError(f"family {family!r}: expected 'hf' or 'llava'")
    if prompt_format != "llava":
        raise ValueError(
            f"prompt_format {prompt_format!r}: the original llava package builds its own "
            "conversation only ('llava')"
        )
    return original.load(model_id, dtype, device, conv_mode, image_aspect)
