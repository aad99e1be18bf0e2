"""Rewriting a vision-encoder layer's output through an SAE: reconstruction and steering.

The protocol of Pach et al. (2025), "Sparse Autoencoders Learn Monosemantic Features in
Vision-Language Models" (ExplainableML/sae-for-vlm, ``models/llava.py``): at CLIP's layer L
(LLaVA-1.5: 22, the layer whose output LLaVA reads), every token, CLS included, is replaced by
the SAE's reconstruction, with chosen concepts clamped to a value (``steer``; 100 in the paper)
and, with ``pre_zero``, every other concept zeroed first. Deviation, opt-in: ``keep_error=True``
adds back the SAE's error ``x - D(E(x))``, so only the clamped concepts change the tokens (the
projector guard's steering does this).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checkpoint import check_compatible
from .intervention import GuardConfig, check_concept_range, steer_delta, steer_tensors
from .sae import Codes, SparseAutoencoder
from .sae_config import SAEConfig


def check_vision_site(
    config: SAEConfig, layer: int, width: int, read_layer: int, needed_by: str
) -> None:
    """Refuse (:class:`ValueError`) an SAE trained elsewhere or for another width, or a layer
    whose output the model never reads; guard(), ``serve`` and the vLLM plugin all check here."""
    site = f"vision_tower:{layer}"
    check_compatible(config, "vision_tower", f"{needed_by} at {site!r}", width, "the vision tower")
    if layer > read_layer:
        raise ValueError(
            f"site {site!r}: the model reads its image features from the output of vision layer "
            f"{read_layer}, so a later layer changes nothing"
        )


class VisionTowerIntervention:
    """``D(z')`` (+ the error with ``keep_error``) for a layer's hidden states (..., d)."""

    def __init__(self, sae: SparseAutoencoder, config: GuardConfig):
        check_concept_range(list(config.steer), sae.config.n_concepts)
        self.sae = sae
        self.config = config
        self._steer_idx, self._steer_val = steer_tensors(config.steer, sae)

    def _steer(self, codes: Codes, weight: Tensor) -> Tensor | float:
        if not len(self._steer_idx):
            return 0.0
        return steer_delta(codes, weight, self._steer_idx, self._steer_val)

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> Tensor:
        cfg = self.config
        shape, dtype = hidden.shape, hidden.dtype
        x = hidden.reshape(-1, shape[-1]).to(self.sae.device, self.sae.dtype)
        codes = self.sae.encode_topk(x, "vision")
        decoder = self.sae.decoder_for("vision")
        if cfg.keep_error and not cfg.pre_zero:  # D(z) + error = x: only the clamps move it
            return (x + self._steer(codes, decoder.weight)).to(hidden.device, dtype).reshape(shape)
        kept = codes
        if cfg.pre_zero:
            kept = Codes(torch.zeros_like(codes.values), codes.indices, codes.n_concepts)
        out = decoder.sparse(kept) + self._steer(kept, decoder.weight)
        if cfg.keep_error:
            out = out + (x - decoder.sparse(codes))
        return out.to(hidden.device, dtype).reshape(shape)
