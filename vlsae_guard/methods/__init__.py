"""Inference methods by name: ``attach(method, model, sae=None, **settings) -> handle``.

``none`` is the model as it is; ``vlsae`` the projector guard, ``paper`` the VL-SAE paper's
layer-L inference and ``cue-mask`` cue masking against the language prior (all
:func:`vlsae_guard.guard`); ``vcd``, ``m3id`` and ``pai`` the peers that
contrast against a counterfactual arm; ``dola`` contrasts the final layer with an early one.
Every handle generates as ``model.generate`` does and ``remove()`` restores the model. Settings
are validated, the SAE loaded and checked, before anything is attached. The names are the ones
``--method`` and results files use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError
from torch import nn

from ..backends import UnsupportedModelError, detect
from ..core.guard import GuardError, guard
from ..core.intervention import GuardConfig
from ..decoding.dola import DoLaSettings
from ..decoding.fusions import M3IDSettings, PAISettings, VCDSettings
from ..validation import FrozenSettings
from .base import Handle, MethodError, MethodHandle, PlainHandle, TwoArmHandle
from .contrast import M3IDHandle, VCDHandle
from .dola import DoLaHandle
from .pai import PAIHandle


class NoSettings(FrozenSettings):
    """``none`` has no settings."""


@dataclass(frozen=True)
class MethodSpec:
    """A method: its settings model, how it attaches, its cost, and for the SAE methods the
    guard mode they run."""

    name: str
    settings: type[FrozenSettings]
    attach: Callable[..., MethodHandle]  # attach(model, settings, sae) -> handle
    arms: int  # forward passes per generated token, relative to plain decoding
    summary: str
    mode: str | None = None  # GuardConfig.mode of an SAE method (vlsae, paper, cue-mask)

    @property
    def needs_sae(self) -> bool:
        return self.mode is not None


def _plain(model, settings, sae):
    return PlainHandle(model)


def _guarded(model, settings: GuardConfig, sae):
    return guard(model, sae, config=settings)


def _two_arm(handle_type: type[TwoArmHandle], name: str):
    def attach(model, settings, sae):
        return handle_type(name, model, detect(model), settings)

    attach.__name__ = f"attach_{name}"
    return attach


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("none", NoSettings, _plain, 1, "the model as it is"),
        MethodSpec(
            "vlsae", GuardConfig, _guarded, 1,
            "VL-SAE guard at the projector: image tokens rebuilt through shared concepts",
            mode="projector",
        ),
        MethodSpec(
            "paper", GuardConfig, _guarded, 2,
            "the VL-SAE paper's inference: text states at layer L shifted, logits fused",
            mode="paper",
        ),
        MethodSpec(
            "cue-mask", GuardConfig, _guarded, 1,
            "VL-SAE cue masking: the asked object's cues masked in the image tokens",
            mode="cue-mask",
        ),
        MethodSpec(
            "vcd", VCDSettings, _two_arm(VCDHandle, "vcd"), 2,
            "Visual Contrastive Decoding: contrast against a diffusion-noised image",
        ),
        MethodSpec(
            "m3id", M3IDSettings, _two_arm(M3IDHandle, "m3id"), 2,
            "M3ID: contrast against the prompt without its image, growing with length",
        ),
        MethodSpec(
            "pai", PAISettings, _two_arm(PAIHandle, "pai"), 2,
            "PAI: attention to the image amplified, contrasted against the prompt without it",
        ),
        MethodSpec(
            "dola", DoLaSettings, _two_arm(DoLaHandle, "dola"), 1,
            "DoLa: contrast the final layer with its most divergent early layer (one forward)",
        ),
    )
}  # fmt: skip
MODES = {n: s.mode for n, s in METHODS.items() if s.mode}  # the SAE methods' guard modes


def method_settings(method: str, settings: FrozenSettings | None = None, **fields):
    """The validated settings of ``method``: ``settings`` as given, or built from ``fields``."""
    spec = spec_of(method)
    if settings is not None and fields:
        raise MethodError("pass either settings=... or keyword settings, not both")
    if settings is None:
        if spec.mode:  # checked first: another mode's settings may fail for other reasons
            _check_mode(spec, fields.setdefault("mode", spec.mode))
        try:
            settings = spec.settings(**fields)
        except ValidationError as e:
            raise MethodError(f"invalid {method} settings:\n{e}") from e
    if not isinstance(settings, spec.settings):
        raise MethodError(
            f"method {method!r} takes {spec.settings.__name__}, found {type(settings).__name__}"
        )
    if spec.mode:
        _check_mode(spec, settings.mode)
    return settings


def _check_mode(spec: MethodSpec, mode: str) -> None:
    if mode != spec.mode:
        raise MethodError(f"method {spec.name!r} runs guard mode {spec.mode!r}, not {mode!r}")


def spec_of(method: str) -> MethodSpec:
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method]


def attach(
    method: str,
    model: nn.Module,
    sae=None,
    settings: FrozenSettings | None = None,
    **fields,
) -> MethodHandle:
    """Attach ``method`` to ``model``; ``sae`` (an SAE or its checkpoint) for ``vlsae``/``paper``.

    Settings, model family and SAE are checked first: on any error nothing is attached.
    """
    spec = spec_of(method)
    settings = method_settings(method, settings, **fields)
    if spec.needs_sae and sae is None:
        raise MethodError(f"method {method!r} needs an SAE (sae=checkpoint directory or VLSAE)")
    if not spec.needs_sae and sae is not None:
        raise MethodError(f"method {method!r} uses no SAE; drop sae=")
    if isinstance(sae, str | os.PathLike) and not os.fspath(sae):
        raise MethodError("sae= is an empty path")
    if method != "none":
        try:
            detect(model)
        except UnsupportedModelError as e:
            raise MethodError(f"method {method!r}: {e}") from e
    try:
        return spec.attach(model, settings, sae)
    except GuardError as e:
        raise MethodError(f"method {method!r}: {e}") from e


__all__ = [
    "METHODS",
    "Handle",
    "MethodError",
    "MethodHandle",
    "MethodSpec",
    "NoSettings",
    "attach",
    "method_settings",
    "spec_of",
]
