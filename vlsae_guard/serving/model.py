"""vLLM's LLaVA and LLaVA-NeXT with the guard on ``multi_modal_projector``.

Registered by :mod:`.plugin` under new architecture names, so no checkpoint changes behaviour
unless it is asked for with ``--hf-overrides '{"architectures": ["VLSAEGuard..."]}'`` (which
``vlsae-guard serve`` adds); Pixtral-HF, which shares ``LlavaForConditionalGeneration``, is
never touched. The settings come from ``VLSAE_GUARD_*`` (:mod:`.settings`); without
``VLSAE_GUARD_SAE`` the classes are their parents exactly (no hook, no buffers).

Per-request A/B: the processor turns ``mm_processor_kwargs={"vlsae_guard": bool}`` into a
per-image field. Request kwargs are part of vLLM's multimodal hash, which keys the processor
cache, the encoder cache (projector outputs) and the prefix cache (image KV blocks), so a guarded
and a plain request for the same image never share cached results; the field reaches
``embed_multimodal`` next to the pixels, and the hook guards only the flagged images' rows.

The SAE is replicated on every tensor-parallel rank and the projector's output is all-reduced
before the hook sees it, so every rank computes the same guarded features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from ..backends.base import vision_tower_shape
from ..core.checkpoint import check_compatible, load
from ..core.cue_mask import CueMask, PromptObjects
from ..core.fit import DEFAULT_MIN_FIT, measure_fit
from ..core.guard import GuardStats
from ..core.intervention import ProjectorIntervention
from ..core.vision_tower import VisionTowerIntervention, check_vision_site
from . import routing
from .settings import ASKED_KEY, REQUEST_KEY, PluginConfigError, ServeSettings


def check_supported(hf_config) -> None:
    """Refuse checkpoints that share LLaVA's class name but not its vision tower (Pixtral-HF)."""
    vision = getattr(hf_config, "vision_config", None)
    kind = getattr(vision, "model_type", None)
    if kind == "pixtral":
        raise PluginConfigError(
            "the vlsae-guard architectures support LLaVA with a CLIP/SigLIP vision tower; this "
            "checkpoint has a Pixtral vision tower (Pixtral-HF), which is not supported"
        )


# --- processors: request switch -> per-image field ---------------------------------------------


class _GuardFlagProcessor:
    """Mixin for a vLLM multimodal processor: checks the request's processor kwargs and emits
    its guard switch per image.

    The check runs in :meth:`apply`, which vLLM calls in the process that renders requests
    (the API server, or the offline ``LLM``) before hashing, caching or the engine, so a
    refused request is a client error (HTTP 400) and never reaches the engine. A request
    without images never reaches a processor; its kwargs go nowhere.
    """

    def __init__(self, info, dummy_inputs) -> None:
        super().__init__(info, dummy_inputs)
        check_supported(info.get_hf_config())
        self.vlsae_settings = ServeSettings.from_env()
        objects = self.vlsae_settings.object_map()
        self.vlsae_prompts = None  # cue masking: reads the asked object off each prompt
        if objects is not None:
            self.vlsae_prompts = PromptObjects(info.get_tokenizer(), list(objects.objects))

    def apply(self, inputs, timing_ctx):
        on = self.vlsae_settings.check_request(
            inputs.hf_processor_mm_kwargs, inputs.media_io_kwargs
        )
        if self.vlsae_prompts is not None:  # before hashing: the object enters the cache keys
            ids = torch.tensor([list(inputs.prompt)])
            (asked,) = self.vlsae_prompts.asked(ids, torch.ones_like(ids, dtype=torch.bool))
            name = self.vlsae_prompts.names[asked] if on and asked is not None else ""
            kwargs = {**inputs.hf_processor_mm_kwargs, ASKED_KEY: name}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]):
        asked = hf_kwargs.get(ASKED_KEY)
        own = {k: v for k, v in hf_kwargs.items() if k != ASKED_KEY}
        on = self.vlsae_settings.check_request(own)
        kwargs = {k: v for k, v in own.items() if k != REQUEST_KEY}
        data = super()._apply_hf_processor_main(mm_items, kwargs)
        n_images = mm_items.get_all_counts().get("image", 0)
        if n_images:
            data[REQUEST_KEY] = torch.full((n_images,), on, dtype=torch.bool)
            if self.vlsae_prompts is not None:
                names = self.vlsae_prompts.names
                index = names.index(asked) if asked in names else -1
                data[ASKED_KEY] = torch.full((n_images,), index, dtype=torch.long)
        return data

    def _get_mm_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        ours = (REQUEST_KEY, ASKED_KEY)
        kwargs = {k: v for k, v in hf_processor_mm_kwargs.items() if k not in ours}
        return super()._get_mm_prompt_updates(mm_items, kwargs, out_mm_kwargs)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[REQUEST_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        if self.vlsae_prompts is not None:
            fields[ASKED_KEY] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


class GuardedLlavaProcessor(_GuardFlagProcessor, LlavaMultiModalProcessor):
    pass


class GuardedLlavaNextProcessor(_GuardFlagProcessor, LlavaNextMultiModalProcessor):
    pass


# --- models --------------------------------------------------------------------------------------


class _GuardedModel:
    """Mixin for vLLM's LLaVA classes: loads the SAE and hooks ``multi_modal_projector``."""

    multi_modal_projector: nn.Module

    def _attach_guard(self, vllm_config) -> None:
        hf_config = vllm_config.model_config.hf_config
        check_supported(hf_config)
        self.vlsae_settings = settings = ServeSettings.from_env()
        self.vlsae_stats = GuardStats()
        self.vlsae_intervention: ProjectorIntervention | CueMask | None = None
        # per step: the images' guard flags, crops per image, and (cue-mask) asked objects
        self._vlsae_batch: tuple[Tensor | None, list[int] | None, Tensor | None] | None = None
        if not settings.enabled:
            return
        weight = next(self.multi_modal_projector.parameters())
        dtype = torch.float32 if settings.dtype == "float32" else vllm_config.model_config.dtype
        sae = load(settings.sae, device=weight.device, dtype=dtype)
        layer = settings.guard.vision_layer
        objects = settings.object_map()
        try:
            if layer is not None:
                check_vision_site(sae.config, layer, *vision_tower_shape(hf_config), "the guard")
                intervention = VisionTowerIntervention(sae, settings.guard)
            else:
                width = hf_config.text_config.hidden_size
                check_compatible(sae.config, "projector", "the vLLM guard", width, "the projector")
                if objects is not None:
                    intervention = CueMask(sae, settings.guard, objects)
                else:
                    intervention = ProjectorIntervention.build(sae, settings.guard)
        except ValueError as e:
            raise PluginConfigError(f"{settings.sae}: {e}") from e
        # A submodule, so its tensors count and move with the model; buffers, so vLLM's
        # loader does not look for them in the checkpoint.
        self.vlsae_sae = routing.freeze_into_buffers(sae)
        self.vlsae_intervention = intervention
        if layer is None:
            self.multi_modal_projector.register_forward_hook(self._vlsae_on_projector)
        else:  # vLLM runs the vision encoder eagerly (only the language model is compiled)
            tower_layer = self.vision_tower.vision_model.encoder.layers[layer]
            tower_layer.register_forward_hook(self._vlsae_on_vision_layer, prepend=True)

    def embed_multimodal(self, **kwargs: object):
        flags = kwargs.pop(REQUEST_KEY, None)
        asked = kwargs.pop(ASKED_KEY, None)
        if self.vlsae_intervention is None:
            return super().embed_multimodal(**kwargs)
        crops = routing.crops_per_image(kwargs.get("pixel_values"))
        n_images = None if crops is None else len(crops)
        asked = routing.image_values(asked, n_images)
        self._vlsae_batch = (routing.image_flags(flags, n_images), crops, asked)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._vlsae_batch = None

    def _vlsae_on_vision_layer(self, module: nn.Module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = self._vlsae_guard(hidden, self.vlsae_settings.guard.site)
        if new is None or not isinstance(output, tuple):
            return new
        return (new, *output[1:])

    def _vlsae_on_projector(self, module: nn.Module, args, output: Tensor) -> Tensor | None:
        intervention = self.vlsae_intervention
        if isinstance(intervention, CueMask):
            flags, crops, asked = self._vlsae_batch or (None, None, None)
            rows = output.numel() // output.shape[-1]
            new = routing.mask_cues(intervention, output, flags, crops, asked)
            self.vlsae_stats.calls += 1
            if self.vlsae_settings.log is not None:
                result = output if new is None else new
                changed = 0 if new is None else int((new != output).any(-1).sum())
                _log(self.vlsae_settings.log, result, flags, crops, rows, changed)
            return new
        return self._vlsae_guard(output, "projector")

    def _vlsae_guard(self, output: Tensor, site: str) -> Tensor | None:
        """The guarded images' rows of ``output`` (the projector's, or a vision layer's) through
        the intervention; None when nothing changes."""
        intervention = self.vlsae_intervention
        flags, crops, _ = self._vlsae_batch or (None, None, None)
        rows = output.numel() // output.shape[-1]
        if flags is None:  # no per-image field (e.g. a dummy batch): the server's default
            mask = torch.full((rows,), self.vlsae_settings.default, dtype=torch.bool)
        elif bool(flags.all()) or not bool(flags.any()):
            mask = torch.full((rows,), bool(flags.any()), dtype=torch.bool)
        elif crops is None:
            raise routing.ProjectorLayoutError(
                "a batch mixes guarded and plain images, but its pixel_values layout does not "
                f"say which {site} rows belong to which image"
            )
        else:
            mask = routing.token_mask(flags, crops, output.shape)
        skip = intervention.config.is_identity
        if not skip and flags is not None and bool(mask.any()) and not hasattr(self, "vlsae_fit"):
            # Once per process, on the first request's guarded rows (not a dummy batch).
            flat = output.reshape(-1, output.shape[-1])[mask.to(output.device)]
            self.vlsae_fit = fit = measure_fit(intervention.sae, site, DEFAULT_MIN_FIT, flat)
            logger = logging.getLogger(__name__)
            if fit.problem is None:
                logger.info("vlsae-guard fit: %s", json.dumps(fit.to_json()))
            else:
                logger.warning("vlsae-guard: %s", fit.problem)
        new = None if skip else routing.guard_rows(intervention, output, mask)
        guarded = 0 if new is None else int(mask.sum())
        self.vlsae_stats.calls += 1
        self.vlsae_stats.image_tokens += guarded
        if self.vlsae_settings.log is not None:
            result = output if new is None else new
            _log(self.vlsae_settings.log, result, flags, crops, rows, guarded)
        return new


def _log(path, result: Tensor, flags: Tensor | None, crops, rows: int, guarded: int) -> None:
    """One JSON line per projector call: what the hook saw, what it changed, and a digest of
    what it returned (equal on every tensor-parallel rank)."""
    record = {
        "pid": os.getpid(),
        "rank": get_tensor_model_parallel_rank(),
        "sha256": hashlib.sha256(_bytes(result)).hexdigest(),
        "shape": list(result.shape),
        "images": None if crops is None else len(crops),
        "crops": None if crops is None else sum(crops),
        "flags": None if flags is None else flags.tolist(),
        "tokens": rows,
        "guarded_tokens": guarded,
    }
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


@MULTIMODAL_REGISTRY.register_processor(
    GuardedLlavaProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VLSAEGuardLlavaForConditionalGeneration(_GuardedModel, LlavaForConditionalGeneration):
    """LLaVA-1.5 (``llava-hf``) with the guard."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_guard(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    GuardedLlavaNextProcessor, info=LlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VLSAEGuardLlavaNextForConditionalGeneration(_GuardedModel, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (``llava-hf/llava-v1.6-*``) with the guard; the image-newline token is
    appended after the projector and is never guarded."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_guard(vllm_config)
