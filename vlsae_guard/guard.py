"""``guard(model, sae)``: one call that attaches a VL-SAE to a loaded LLaVA model.

Everything is validated first (settings, model, SAE, widths); only then are hooks attached, so a
failed call leaves the model untouched. The returned handle removes exactly what it added.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from .backends import Backend, Prompt, detect
from .checkpoint import load
from .intervention import GuardConfig, ProjectorIntervention
from .sae import SparseAutoencoder

# Models currently guarded, so a second guard() is refused instead of stacking hooks.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, GuardHandle] = weakref.WeakKeyDictionary()


class GuardError(RuntimeError):
    """The guard cannot be attached (or was misused); the model is unchanged."""


@dataclass
class GuardStats:
    """What the hook has done since attachment; tests and users read it to see it ran."""

    calls: int = 0
    image_tokens: int = 0

    def reset(self) -> None:
        self.calls = self.image_tokens = 0


class GuardHandle:
    """A guarded model. ``remove()`` restores it; usable as a context manager."""

    def __init__(self, model: nn.Module, backend: Backend, intervention: ProjectorIntervention):
        self.model = model
        self.backend = backend
        self.intervention = intervention
        self.stats = GuardStats()
        self.enabled = True
        self._undo: list = []
        self._prompt: Prompt | None = None
        self._text_masks: Tensor | None = None

    @property
    def config(self) -> GuardConfig:
        return self.intervention.config

    @property
    def attached(self) -> bool:
        return bool(self._undo)

    def _attach(self) -> None:
        projector = self.backend.projector()
        self._undo.append(projector.register_forward_hook(self._on_projector).remove)
        if self.config.text_grounded:
            self._undo.append(self.backend.capture_prompt(self._on_prompt))
        _ACTIVE[self.model] = self

    def remove(self) -> None:
        """Detach every hook; calling it again is a no-op."""
        while self._undo:
            self._undo.pop()()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self._prompt = self._text_masks = None

    @contextmanager
    def disabled(self) -> Iterator[GuardHandle]:
        """Temporarily run the unguarded model (A/B in one process)."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def __enter__(self) -> GuardHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        if not self.attached:
            state = "removed"
        return f"GuardHandle({self.backend.name}, {state}, {self.config!r})"

    # -- hooks -------------------------------------------------------------------------------

    def _on_prompt(self, prompt: Prompt) -> None:
        if not self.enabled:
            return
        embeds = self.backend.embed(prompt.input_ids.clamp_min(0))
        keep = prompt.text_positions()
        self._prompt = prompt
        self._text_masks = self.intervention.text_concepts(
            [embeds[i][keep[i]] for i in range(len(embeds))]
        )

    def _on_projector(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if not self.enabled or self.config.is_identity:
            return None
        owners = None
        text_masks = None
        if self.config.text_grounded:
            if self._prompt is None:
                raise GuardError(
                    "text-grounded guarding needs the prompt's input_ids, but the projector ran "
                    "without them (inputs_embeds-only calls are not supported in this mode)"
                )
            rows = output.shape[0] if output.dim() == 3 else 1
            tokens = output.shape[-2] if output.dim() == 3 else output.shape[0]
            counts = self.backend.rows_per_sample(self._prompt, rows, tokens)
            owners = torch.repeat_interleave(torch.arange(len(counts)), counts)
            owners = owners.repeat_interleave(tokens)
            text_masks = self._text_masks
            self._prompt = self._text_masks = None
        self.stats.calls += 1
        self.stats.image_tokens += output.numel() // output.shape[-1]
        return self.intervention(output, owners, text_masks)


def guard(
    model: nn.Module,
    sae: SparseAutoencoder | str | os.PathLike,
    config: GuardConfig | None = None,
    **settings,
) -> GuardHandle:
    """Attach ``sae`` to ``model``'s multimodal projector and return the handle.

    ``settings`` are :class:`GuardConfig` fields (``method``, ``alpha``, ``text_grounded``,
    ``shared_concepts``, ``steer``); pass either them or a ``config``.
    """
    if config is not None and settings:
        raise GuardError("pass either config=GuardConfig(...) or keyword settings, not both")
    try:
        config = config if config is not None else GuardConfig(**settings)
    except ValidationError as e:
        raise GuardError(f"invalid guard settings:\n{e}") from e
    if model in _ACTIVE:
        raise GuardError(
            f"this {type(model).__name__} is already guarded; call remove() on its handle "
            "before guarding it again"
        )
    backend = detect(model)
    if not isinstance(sae, SparseAutoencoder):
        sae = load(sae)
    width = backend.out_features()
    if width != sae.config.d_in:
        raise GuardError(
            f"the {backend.name} projector outputs width {width}, but the SAE expects "
            f"d_in={sae.config.d_in}: this SAE was trained for another model"
        )
    if sae.config.source.site != "projector":
        raise GuardError(
            f"mode 'projector' needs an SAE trained at the projector output, this one was "
            f"trained at site {sae.config.source.site!r} (layer {sae.config.source.layer})"
        )
    device = next(backend.projector().parameters()).device
    if sae.device != device:
        sae = copy.deepcopy(sae).to(device)  # never move the caller's SAE behind their back
    try:
        intervention = ProjectorIntervention.build(sae.eval(), config)
    except ValueError as e:
        raise GuardError(str(e)) from e
    handle = GuardHandle(model, backend, intervention)
    handle._attach()
    return handle
