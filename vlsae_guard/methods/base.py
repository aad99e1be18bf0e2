"""What every inference method hands back: a handle with ``generate()`` and ``remove()``.

A method is attached to a loaded model once and then generates as ``model.generate`` does (the
same inputs, the same decoding arguments, the same return value), so a harness, a notebook or a
test swaps methods without touching anything else. ``remove()`` restores the model exactly.
Two-arm methods (:class:`TwoArmHandle`) decode on the fused decoding engine
(:mod:`vlsae_guard.decoding`): they only say what their arms are and how they fuse.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from ..backends import Backend
from ..decoding import Arms, DecodingOptions, fused_generate


class MethodError(RuntimeError):
    """A method cannot be attached or cannot run as asked; the model is unchanged."""


class MethodHandle(Protocol):
    """An attached method: ``generate`` as ``model.generate``; ``remove`` undoes the attach."""

    method: str

    def generate(self, *args, **kwargs) -> Any: ...

    def remove(self) -> None: ...


class Handle:
    """Context-manager plumbing shared by the handles defined here."""

    method = "none"
    # generate() takes seed=[one per sample] (the fused decoding engine); model.generate does not
    seeds_per_sample = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Nothing attached; calling it again is a no-op."""

    @property
    def fit(self):
        """The guard's placement check (:class:`vlsae_guard.GuardFit`); None: no SAE here."""
        return None


class PlainHandle(Handle):
    """``method="none"``: the model's own ``generate``, untouched (bit-identical)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def generate(self, *args, **kwargs) -> Any:
        return self.model.generate(*args, **kwargs)


class TwoArmHandle(Handle):
    """A method with two arms and a fusion; subclasses build the arms of one call.

    ``settings.fuse(logits_a, logits_b, step)`` is the fusion (a pure function of the method's
    settings, :mod:`vlsae_guard.decoding.fusions`).
    """

    seeds_per_sample = True

    def __init__(self, method: str, model: nn.Module, backend: Backend, settings):
        self.method, self.model, self.backend, self.settings = method, model, backend, settings

    def arms(self, inputs: dict[str, Any], options: DecodingOptions) -> Arms:
        raise NotImplementedError

    def fuse(self, logits_a: Tensor, logits_b: Tensor, step: int) -> Tensor:
        return self.settings.fuse(logits_a, logits_b, step)

    @torch.no_grad()
    def generate(self, *args, **kwargs) -> Any:
        """``model.generate``'s arguments; returns what it would: the fused sequences."""
        try:
            return fused_generate(self.model, args, kwargs, self.arms, self.fuse)
        except (ValueError, ValidationError) as e:
            raise MethodError(f"{self.method} generate() on {self.backend.name}: {e}") from e
