"""VCD and M3ID on the fused decoding engine: what their second arm sees.

VCD's arm *b* is the same prompt with a diffusion-noised image, decoded in the same batch as arm
*a* (one stream of 2B rows); M3ID's is the prompt without its image, decoded as its own stream.
Their fusions and defaults are in :mod:`vlsae_guard.decoding.fusions` (with their sources).
"""

from __future__ import annotations

from typing import Any

import torch

from ..decoding import DecodingOptions, SeparateArms, SharedBatch, Stream, doubled
from ..decoding.counterfactuals import diffusion_noise
from .base import TwoArmHandle


def noised_pixels(pixels, noise_step: int, seed: int):
    """VCD's noised image for every sample, each drawn as if it were alone in its batch (a
    sample's noise does not depend on its batch): a tensor (B, ...) or a list of tensors."""
    if isinstance(pixels, list | tuple):
        return [noised_pixels(p, noise_step, seed) for p in pixels]
    if not torch.is_tensor(pixels):
        raise ValueError(f"expected image pixels as a tensor or a list, found {type(pixels)}")
    return torch.cat([diffusion_noise(p[None], noise_step, seed) for p in pixels])


class VCDHandle(TwoArmHandle):
    """Visual Contrastive Decoding: arm *b* sees the noised image (rows ``[B:]``)."""

    def arms(self, inputs: dict[str, Any], options: DecodingOptions) -> SharedBatch:
        key = self.backend.pixel_key
        pixels = inputs.get(key)
        if pixels is None:
            raise ValueError(f"VCD contrasts against a noised image, and no {key!r} was given")
        both = {k: doubled(v) for k, v in inputs.items()}
        noised = noised_pixels(pixels, self.settings.noise_step, self.settings.noise_seed)
        both[key] = pixels + noised if isinstance(pixels, list) else torch.cat([pixels, noised])
        prompt = self.backend.prompt_inputs(both)
        return SharedBatch(Stream(self.model, prompt, use_cache=options.use_cache))


class M3IDHandle(TwoArmHandle):
    """M3ID: arm *b* is the prompt without its image (its own stream and cache)."""

    def arms(self, inputs: dict[str, Any], options: DecodingOptions) -> SeparateArms:
        text_only = self.backend.without_images(inputs)
        a = Stream(self.model, self.backend.prompt_inputs(inputs), use_cache=options.use_cache)
        b = Stream(self.model, self.backend.prompt_inputs(text_only), use_cache=options.use_cache)
        return SeparateArms(a, b)
