"""DoLa on the fused decoding engine: one forward per token, both arms read from it.

Arm *a* is the final layer's logits, arm *b* the early exit of the premature layer chosen for
each sample and step (:class:`vlsae_guard.decoding.dola.LayerContrast`), read by hooks that
live only during ``generate()``, so attaching changes nothing on the model; the fusion, the
candidate layers, the defaults and their sources are in :mod:`vlsae_guard.decoding.dola`. The
repetition penalty DoLa runs with is the method's (``DoLaSettings.repetition_penalty``), applied
to the DoLa scores before the caller's logits processors, as transformers (< 4.53) applied it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backends import Backend, UnsupportedModelError
from ..decoding import DecodingOptions, generate_inputs
from ..decoding.dola import (
    DoLaSettings,
    LayerContrast,
    LayerStream,
    LayerTap,
    RepeatPenalty,
    candidate_layers,
)
from .base import MethodError, TwoArmHandle


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the language model's config ties its output head to the input embeddings (what
    transformers reads to skip the embedding layer's early exit)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


class DoLaHandle(TwoArmHandle):
    """DoLa: contrast the final layer with the premature layer that diverges most from it.

    ``layers`` holds the candidate premature layers on this model; ``chosen`` the premature
    layer of each sample at each step of the last ``generate()`` call ((B,) tensors).
    """

    def __init__(self, method: str, model: nn.Module, backend: Backend, settings: DoLaSettings):
        super().__init__(method, model, backend, settings)
        try:
            self.num_layers = len(backend.decoder_layers())
            self.layers = candidate_layers(settings.layers, self.num_layers, tied_embeddings(model))
            head = backend.output_head()
            norm = backend.final_norm() if settings.final_norm else None
        except (ValueError, UnsupportedModelError) as e:
            raise MethodError(f"{method} on {backend.name}: {e}") from e
        self.head = head if norm is None else (lambda states: head(norm(states)))
        self.chosen: list[Tensor] = []
        self._tap: LayerTap | None = None  # the early-exit hooks, during generate() only

    def arms(self, inputs: dict[str, Any], options: DecodingOptions) -> LayerContrast:
        if self._tap is None:
            raise RuntimeError("DoLa's arms run inside its generate()")
        prompt = self.backend.prompt_inputs(inputs)
        stream = LayerStream(self.model, prompt, self._tap, use_cache=options.use_cache)
        arms = LayerContrast(stream, self.head)
        self.chosen = arms.chosen
        return arms

    @torch.no_grad()
    def generate(self, *args, **kwargs) -> Any:
        """``model.generate``'s arguments; the repetition penalty is the method's setting."""
        if kwargs.get("repetition_penalty") is not None:
            raise MethodError(
                f"{self.method}: the repetition penalty is a setting of the method "
                f"(attach('{self.method}', model, repetition_penalty=...), now "
                f"{self.settings.repetition_penalty}), not a generate() argument"
            )
        penalty = self.settings.repetition_penalty
        if penalty != 1.0:
            try:
                inputs = generate_inputs(args, kwargs)
            except ValueError as e:
                raise MethodError(f"{self.method} generate() on {self.backend.name}: {e}") from e
            first = RepeatPenalty(penalty, inputs["input_ids"], inputs.get("attention_mask"))
            kwargs = {
                **kwargs,
                "logits_processor": [first, *(kwargs.get("logits_processor") or ())],
            }
        with LayerTap(self.backend.decoder_layers(), self.layers) as self._tap:
            try:
                return super().generate(*args, **kwargs)
            finally:
                self._tap = None
