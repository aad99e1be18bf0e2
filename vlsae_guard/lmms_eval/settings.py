"""``vlsae_llava``'s settings and lmms-eval's request fields, read without lmms-eval.

``--model_args`` are :class:`LmmsModelConfig`'s fields, and the method's own settings (for the
SAE methods the :class:`~vlsae_guard.core.intervention.GuardConfig` fields: ``mode``, ``alpha``,
``rewrite``, ``steer``, ``site``, ...; for the peers theirs), e.g.
``pretrained=llava-hf/llava-1.5-7b-hf,sae=DIR,method=vlsae,alpha=0.5``. Answers come from
:func:`vlsae_guard.harness.generation.load` (the generator ``benchmarks/pope.py`` uses): the
backend's prompt around lmms-eval's text (``prompt_format``), left-padded batches that answer as
one request at a time, greedy or sampled as the task's ``generation_kwargs`` say, stopped at
their ``until`` strings. One image per request (LLaVA-1.5's and LLaVA-NeXT's format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from .. import methods, provenance
from ..backends import ImageAspect
from ..harness import generation
from ..harness.generation import PROMPT_FORMATS, Decoding
from ..validation import FrozenSettings, describe_validation_error
from . import MODEL_NAME


class LmmsModelConfig(FrozenSettings):
    """What ``vlsae_llava`` is loaded with (besides the method's settings)."""

    pretrained: str  # a LLaVA checkpoint folder or Hub id
    sae: str | None = None  # the SAE checkpoint (the SAE methods)
    method: str | None = None  # vlsae_guard.methods name; None: vlsae with an SAE, else none
    backend: Literal["hf", "vllm"] = "hf"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str | None = None  # None: cuda when there is one
    prompt_format: Literal[PROMPT_FORMATS] = "llava"
    image_aspect: ImageAspect | None = None
    batch_size: int = Field(default=1, ge=1)  # lmms-eval's --batch_size
    seed: int = 0
    engine_args: dict[str, Any] = Field(default_factory=dict)  # backend vllm: vllm.LLM kwargs

    @property
    def arm(self) -> str:
        return self.method or ("vlsae" if self.sae else "none")


def read_model_args(args: dict[str, Any]) -> tuple[LmmsModelConfig, Any]:
    """The model's own settings and the method's (validated), from lmms-eval's parsed
    ``--model_args`` (a ``mode`` without ``method`` names the SAE method that runs it)."""
    args = {k: _json(k, v) for k, v in args.items()}
    own = {k: v for k, v in args.items() if k in LmmsModelConfig.model_fields}
    rest = {k: v for k, v in args.items() if k not in own}
    if "method" not in own and "mode" in rest:
        by_mode = {mode: name for name, mode in methods.MODES.items()}
        own["method"] = by_mode.get(rest["mode"], rest["mode"])
    try:
        config = LmmsModelConfig(**own)
    except ValidationError as e:
        raise ValueError(f"vlsae_llava --model_args:\n{describe_validation_error(e)}") from e
    try:
        settings = methods.method_settings(config.arm, **rest)
    except methods.MethodError as e:
        raise ValueError(f"vlsae_llava --model_args: {e}") from e
    if methods.spec_of(config.arm).needs_sae and config.sae is None:
        raise ValueError(f"vlsae_llava --model_args: method {config.arm!r} needs sae=DIR")
    if config.backend == "vllm" and config.arm not in generation.SERVED_ARMS:
        raise ValueError(
            f"vlsae_llava --model_args: backend vllm runs {', '.join(generation.SERVED_ARMS)}, "
            f"not {config.arm!r} (docs/serving.md, 'Methods under vLLM')"
        )
    return config, settings


def provenance_of(config: LmmsModelConfig, settings) -> dict[str, Any]:
    """The model's settings, the method's, and the hashes of the checkpoint and SAE folders."""

    def digest(path: str | None) -> str | None:
        return provenance.sha256_dir(Path(path)) if path and Path(path).is_dir() else None

    return {
        "model": MODEL_NAME,
        **config.model_dump(mode="json"),
        "method": config.arm,
        "method_settings": settings.model_dump(mode="json"),
        "model_sha256": digest(config.pretrained),
        "sae_sha256": digest(config.sae),
        "environment": provenance.environment(),
    }


def _json(name: str, value: Any) -> Any:
    """A JSON object or list given as text (``steer='{"12": 1.5}'``, ``engine_args``) parsed:
    lmms-eval hands every value over as text, numbers and booleans aside."""
    if not isinstance(value, str) or not value.strip().startswith(("{", "[")):
        return value
    try:
        return json.loads(value)
    except ValueError as e:
        raise ValueError(f"vlsae_llava --model_args {name}: not valid JSON ({e})") from e


def decoding_of(gen_kwargs: dict[str, Any]) -> tuple[Decoding, list[str]]:
    """lmms-eval's ``generation_kwargs`` as the harness's decoding, and the stop strings."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", [])
    until = [until] if isinstance(until, str) else list(until)
    if int(kwargs.pop("num_beams", 1)) != 1:
        raise ValueError("vlsae_llava decodes greedily or by sampling; num_beams must be 1")
    sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0))
    temperature = temperature if sample else 0.0
    top_p, top_k = kwargs.pop("top_p", None), kwargs.pop("top_k", None)
    decoding = Decoding(
        max_new_tokens=int(kwargs.pop("max_new_tokens", 128)),
        temperature=temperature,
        top_p=None if top_p is None or not sample else float(top_p),
        top_k=None if top_k is None or not sample else int(top_k),
    )
    kwargs.pop("image_aspect_ratio", None)  # llava tasks' hint; the backend's processor decides
    if kwargs:
        raise ValueError(f"vlsae_llava does not support generation_kwargs {sorted(kwargs)}")
    return decoding, until


def cut(text: str, until: list[str]) -> str:
    """``text`` up to the first stop string (lmms-eval's ``until``), stripped."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()
