"""``guard(model, sae)``: one call that attaches a VL-SAE to a loaded LLaVA model.

Everything is validated first (settings, model, SAE, widths); only then are hooks attached, so a
failed call leaves the model untouched. The returned handle removes exactly what it added.

Metadata cannot show that a checkpoint fits the site it is used at (an imported one records no
site; the released VL-SAE was trained on mean-pooled layer-30 states), so the first guarded batch
also measures the SAE's explained variance there (:class:`GuardFit`, ``handle.fit``).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from ..backends import Backend, Prompt, detect
from ..decoding import DecodingOptions, SharedBatch, Stream, doubled, fused_generate
from .checkpoint import CheckpointError, check_compatible, check_module, load
from .cue_mask import CueMask, object_map_path
from .fit import DEFAULT_MIN_FIT, GuardFit, GuardFitWarning, measure_fit
from .intervention import GuardConfig, ProjectorIntervention
from .object_evidence import ObjectConcepts
from .paper import FusionProcessor, PaperIntervention, PaperState
from .sae import SparseAutoencoder
from .sae_config import Point, layer_site
from .vision_tower import VisionTowerIntervention, check_vision_site

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

    def __init__(
        self,
        model: nn.Module,
        backend: Backend,
        intervention: ProjectorIntervention | PaperIntervention | CueMask | VisionTowerIntervention,
        min_fit: float = DEFAULT_MIN_FIT,
        strict: bool = False,
    ):
        self.model = model
        self.backend = backend
        self.intervention = intervention
        self.paper = (
            PaperState(intervention) if isinstance(intervention, PaperIntervention) else None
        )
        self.stats = GuardStats()
        self.enabled = True
        self.min_fit = min_fit
        self.strict = strict
        self.fit: GuardFit | None = None  # filled by the first guarded batch
        self._undo: list = []
        self._prompt: Prompt | None = None
        self._text_masks: Tensor | None = None
        self._asked: list[int | None] | None = None  # cue-mask: the object each prompt names
        self._fit_text: Tensor | None = None  # the first prompt's text tokens (text-grounded)

    @property
    def config(self) -> GuardConfig:
        return self.intervention.config

    @property
    def attached(self) -> bool:
        return bool(self._undo)

    def _attach(self) -> None:
        if self.paper is not None:
            layer = self.backend.decoder_layers()[self.config.layer]
            if self.config.point == "output":
                hook = layer.register_forward_hook(self._on_layer_output)
            else:
                hook = layer.register_forward_pre_hook(self._on_layer_input, with_kwargs=True)
            self._undo.append(hook.remove)
            self._undo.append(self.backend.capture_layout(self._on_layout))
        elif isinstance(self.intervention, VisionTowerIntervention):
            layer = self.backend.vision_layers()[self.config.vision_layer]
            # First in line: transformers records hidden states (LLaVA reads its image features
            # from them) with its own forward hooks, which must see the rewritten output.
            hook = layer.register_forward_hook(self._on_vision_layer, prepend=True)
            self._undo.append(hook.remove)
        elif isinstance(self.intervention, CueMask):
            projector = self.backend.projector()
            self._undo.append(projector.register_forward_hook(self._on_cue_projector).remove)
            self._undo.append(self.backend.capture_prompt(self._on_cue_prompt))
        else:
            projector = self.backend.projector()
            self._undo.append(projector.register_forward_hook(self._on_projector).remove)
            if self.config.text_grounded:
                self._undo.append(self.backend.capture_prompt(self._on_prompt))
        _ACTIVE[self.model] = self

    @property
    def seeds_per_sample(self) -> bool:
        """Whether generate() takes ``seed=[one per sample]``: paper mode's fused decoding."""
        return self.paper is not None and self.enabled and self.attached

    @property
    def method(self) -> str:
        """The inference method's name (:mod:`vlsae_guard.methods`): ``vlsae``, ``paper`` or
        ``cue-mask``."""
        return {"paper": "paper", "cue-mask": "cue-mask"}.get(self.config.mode, "vlsae")

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``model.generate`` with this guard; in paper mode, fused decoding.

        Paper mode decodes a doubled batch (plain rows, then guarded rows) with the decoding
        engine (:mod:`vlsae_guard.decoding`): each step fuses the two halves' logits, chooses
        one token per sample (greedy, or sampled: ``seed`` or ``generator`` besides generate()'s
        arguments) and feeds it to both, so the fusion always compares the same prefix.
        Returns what ``model.generate`` would: the fused sequences.
        """
        if self.paper is None or not self.enabled or not self.attached:
            return self.model.generate(*args, **kwargs)
        overrides = {"use_cache": False} if self.config.exact else {}
        fusion = FusionProcessor(self.config.c_alpha, self.config.c_beta)
        try:
            return fused_generate(
                self.model, args, kwargs, self._paper_arms, fusion.fuse, **overrides
            )
        except (ValueError, ValidationError) as e:
            raise GuardError(f"paper-mode generate() on {self.backend.name}: {e}") from e
        finally:
            self.paper.fused_rows = None
            self.paper.end()

    def _paper_arms(self, inputs: dict, options: DecodingOptions) -> SharedBatch:
        """One stream of 2B rows: plain rows [:B], the rows the paper shift acts on [B:]."""
        self.paper.fused_rows = inputs["input_ids"].shape[0]
        prompt = self.backend.prompt_inputs({k: doubled(v) for k, v in inputs.items()})
        return SharedBatch(Stream(self.model, prompt, use_cache=options.use_cache))

    def remove(self) -> None:
        """Detach every hook; calling it again is a no-op."""
        while self._undo:
            self._undo.pop()()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self._prompt = self._text_masks = self._fit_text = None
        self._asked = None
        if self.paper is not None:
            self.paper.end()

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
        texts = [embeds[i][keep[i]] for i in range(len(embeds))]
        self._prompt = prompt
        self._text_masks = self.intervention.text_concepts(texts)
        if self.fit is None:
            self._fit_text = torch.cat(texts)

    def _on_layout(self, image_mask: Tensor, attention_mask: Tensor | None) -> None:
        self.paper.begin(image_mask, attention_mask)

    def _on_layer_output(self, module: nn.Module, args, output):
        if not self.enabled or self.config.is_identity:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = self._paper_step(self.paper(hidden))
        if new is None or not isinstance(output, tuple):
            return new
        return (new, *output[1:])

    def _on_layer_input(self, module: nn.Module, args, kwargs):
        if not self.enabled or self.config.is_identity:
            return None
        if args:
            new = self._paper_step(self.paper(args[0]))
            return None if new is None else ((new, *args[1:]), kwargs)
        new = self._paper_step(self.paper(kwargs["hidden_states"]))
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    def _paper_step(self, new: Tensor | None) -> Tensor | None:
        """Count a shifted call; the first with an image measures the fit first."""
        if new is None:
            return None
        batch = self.paper.batch
        if self.fit is None and bool(batch.has_image.any()):
            v_bar, t_bar = batch.pooled()
            self._measure_fit(
                layer_site(self.config.layer, self.config.point),
                self.intervention.sae_inputs(v_bar, "vision"),
                self.intervention.sae_inputs(t_bar, "text"),
                self.config.point,
            )
        self.stats.calls += 1
        return new

    def _measure_fit(
        self, site: str, vision: Tensor, text: Tensor | None, point: Point | None = None
    ) -> None:
        """Fill ``fit``; below ``min_fit``, warn, or (strict) detach and raise."""
        sae = self.intervention.sae
        self.fit = measure_fit(sae, site, self.min_fit, vision, text, point)
        self._fit_text = None
        problem = self.fit.problem
        if problem is None:
            return
        if self.strict:
            self.remove()
            raise GuardError(
                f"strict=True: {problem}. The guard was removed before it changed anything: this "
                "call's outputs were not rewritten and the model now runs unguarded"
            )
        warnings.warn(problem, GuardFitWarning, stacklevel=2)

    def _on_projector(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if not self.enabled or self.config.is_identity:
            return None
        owners = None
        text_masks = None
        if self.config.text_grounded:
            counts, tokens = self._rows_per_sample(output, "text-grounded guarding")
            owners = torch.repeat_interleave(torch.arange(len(counts)), counts)
            owners = owners.repeat_interleave(tokens)
            text_masks = self._text_masks
            self._prompt = self._text_masks = None
        if self.fit is None:
            self._measure_fit("projector", output, self._fit_text)
        self.stats.calls += 1
        self.stats.image_tokens += output.numel() // output.shape[-1]
        return self.intervention(output, owners, text_masks)

    def _rows_per_sample(self, output: Tensor, what: str) -> tuple[Tensor, int]:
        """The captured prompt's projector rows per sample, and tokens per row."""
        if self._prompt is None:
            raise GuardError(
                f"{what} needs the prompt's input_ids, but the projector ran without them "
                "(inputs_embeds-only calls are not supported in this mode)"
            )
        rows = output.shape[0] if output.dim() == 3 else 1
        tokens = output.shape[-2] if output.dim() == 3 else output.shape[0]
        return self.backend.rows_per_sample(self._prompt, rows, tokens), tokens

    def _on_vision_layer(self, module: nn.Module, args, output):
        if not self.enabled or self.config.is_identity:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if self.fit is None:
            self._measure_fit(self.config.site, hidden, None)
        self.stats.calls += 1
        self.stats.image_tokens += hidden.numel() // hidden.shape[-1]
        new = self.intervention(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _on_cue_prompt(self, prompt: Prompt) -> None:
        if self.enabled:
            self._prompt = prompt
            self._asked = self.intervention.prompts.asked(prompt.input_ids, prompt.text_positions())

    def _on_cue_projector(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        if not self.enabled:
            return None
        counts, _ = self._rows_per_sample(output, "cue masking")
        asked, self._prompt, self._asked = self._asked, None, None
        if self.fit is None:
            self._measure_fit("projector", output, None)
        self.stats.calls += 1
        self.stats.image_tokens += output.numel() // output.shape[-1]
        return self.intervention(output, counts, asked)


def guard(
    model: nn.Module,
    sae: SparseAutoencoder | str | os.PathLike,
    config: GuardConfig | None = None,
    *,
    min_fit: float = DEFAULT_MIN_FIT,
    strict: bool = False,
    tokenizer=None,
    **settings,
) -> GuardHandle:
    """Attach ``sae`` to ``model``'s multimodal projector and return the handle.

    ``settings`` are :class:`GuardConfig` fields (``rewrite``, ``alpha``, ``text_grounded``,
    ``shared_concepts``, ``steer``; ``method="vlsae" | "paper" | "cue-mask"`` picks the mode);
    pass either them or a ``config``. Cue masking (``method="cue-mask"``) reads an object map
    (``objects=``, default ``objects.json`` in the checkpoint's directory) and the model's
    ``tokenizer`` (default: loaded from the model's ``name_or_path``).

    The first guarded batch measures ``handle.fit`` (:class:`GuardFit`). If the SAE's checkpoint
    names another site, or its vision explained variance is below ``min_fit`` or could not be
    measured, it warns (:class:`GuardFitWarning`); with ``strict=True`` it raises
    :class:`GuardError` instead, before the hook changes anything: the handle is then removed (as
    by ``remove()``, with ``fit`` kept), so the model and ``handle.generate`` run unguarded.
    """
    if config is not None and settings:
        raise GuardError("pass either config=GuardConfig(...) or keyword settings, not both")
    if not math.isfinite(min_fit):
        raise GuardError(f"min_fit must be a finite explained variance, got {min_fit}")
    try:
        config = config if config is not None else GuardConfig(**settings)
    except ValidationError as e:
        raise GuardError(f"invalid guard settings:\n{e}") from e
    if tokenizer is not None and config.mode != "cue-mask":
        raise GuardError(f"tokenizer= is read by mode 'cue-mask' only, not {config.mode!r}")
    if model in _ACTIVE:
        raise GuardError(
            f"this {type(model).__name__} is already guarded; call remove() on its handle "
            "before guarding it again"
        )
    backend = detect(model)
    source = None if isinstance(sae, SparseAutoencoder) else os.fspath(sae)
    if isinstance(sae, SparseAutoencoder):
        try:  # a checkpoint on disk is checked when it is loaded; one built here is not
            check_module(sae, f"the {type(sae).__name__} given to guard()")
        except CheckpointError as e:
            raise GuardError(str(e)) from e
    else:
        sae = load(sae)
    _check_fits(backend, sae, config)
    hooked = backend.projector() if config.vision_layer is None else backend.vision_layers()
    device = next(hooked.parameters()).device
    dtype = getattr(torch, config.sae_dtype) if config.sae_dtype else sae.dtype
    if sae.device != device or sae.dtype != dtype:
        # Never move or cast the caller's SAE behind their back (the auxiliary AE goes along).
        sae = copy.deepcopy(sae).to(device=device, dtype=dtype)
    sae.eval()
    try:
        if config.mode == "cue-mask":
            intervention = _cue_mask(model, sae, config, source, tokenizer)
        elif config.mode == "paper":
            intervention = PaperIntervention(sae, config)
        elif config.vision_layer is not None:
            intervention = VisionTowerIntervention(sae, config)
        else:
            intervention = ProjectorIntervention.build(sae, config)
    except ValueError as e:
        raise GuardError(str(e)) from e
    handle = GuardHandle(model, backend, intervention, min_fit=min_fit, strict=strict)
    handle._attach()
    return handle


def _cue_mask(model, sae, config: GuardConfig, source: str | None, tokenizer) -> CueMask:
    """The object map and the tokenizer, every problem raised before anything attaches."""
    objects = ObjectConcepts.load(object_map_path(config, source))
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"mode 'cue-mask' needs the model's tokenizer: pass tokenizer= ({name!r}: {e})"
            ) from e
    return CueMask(sae, config, objects, tokenizer)


def _check_fits(backend: Backend, sae: SparseAutoencoder, config: GuardConfig) -> None:
    """Every reason this SAE cannot guard this model, raised before anything is attached."""
    if config.vision_layer is not None:
        return _check_vision_layer(backend, sae, config.vision_layer)
    projector = config.mode != "paper"
    try:
        check_compatible(
            sae.config,
            "projector" if projector else "layer",
            f"mode {config.mode!r}",
            backend.out_features() if projector else None,
            f"the {backend.name} projector",
        )
    except ValueError as e:
        raise GuardError(str(e)) from e
    if projector:
        return
    cfg = sae.config
    layers = len(backend.decoder_layers())
    if config.layer >= layers:
        raise GuardError(f"layer={config.layer} but the language model has {layers} layers")
    hidden = backend.hidden_size()
    widths = (cfg.aux.d_vision, cfg.aux.d_text) if cfg.aux else (cfg.d_in, cfg.d_in)
    if any(w != hidden for w in widths):
        raise GuardError(
            f"the language model's hidden size is {hidden}, but the SAE"
            + (" (through its auxiliary AE)" if cfg.aux else "")
            + f" reads widths {widths}"
        )
    if config.exact and backend.name == "llava":
        raise GuardError(
            "exact=True re-runs the full sequence without the KV cache, which the original llava "
            "package's generate() cannot do (it starts from inputs_embeds); use the transformers "
            "backend or exact=False"
        )


def _check_vision_layer(backend: Backend, sae: SparseAutoencoder, layer: int) -> None:
    try:
        read = backend.vision_feature_layer()
        check_vision_site(sae.config, layer, backend.vision_width(), read, "the guard")
    except ValueError as e:
        raise GuardError(str(e)) from e
