"""Paper mode: the VL-SAE paper's own inference at decoder layer L, with the KV cache.

At layer L, ``v_bar`` is the mean of the image positions and ``t_bar`` the mean of the text
positions after the image. Both go through the auxiliary AE and the SAE; the text code is pulled
towards the vision code, ``z_t' = (1 - beta) z_t + beta z_v``, decoded back, and every text
position after the image is shifted by ``t_new - t_bar`` with
``t_new = (1 - alpha) t_bar + alpha aux_dec(D_text(z_t'))``. Generation fuses plain and guarded
logits (:class:`FusionProcessor`) in the decoding engine (:mod:`vlsae_guard.decoding`): one batch
of 2B rows, the shift applied to rows [B:], one token per sample fed to both halves.

The official code re-runs the whole sequence twice per new token. Here the unshifted layer-L
states are summed as they arrive: they do not depend on any shift (the shift happens at layer L),
so ``t_bar`` is exact at every step, and only the shift of earlier positions is frozen at the
value of their own step. ``exact=True`` re-runs everything (the official semantics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .intervention import GuardConfig
from .sae import SparseAutoencoder
from .sae_config import Modality


class PaperIntervention:
    """The formulas of paper mode on pooled vectors; no model, no backend."""

    def __init__(self, sae: SparseAutoencoder, config: GuardConfig):
        self.sae = sae
        self.config = config

    @torch.no_grad()
    def sae_inputs(self, pooled: Tensor, modality: Modality) -> Tensor:
        """Pooled layer states as the SAE reads them: through the auxiliary AE, if any."""
        x = pooled.to(self.sae.device, self.sae.dtype)
        return self.sae.aux.project(x, modality) if self.sae.aux else x

    @torch.no_grad()
    def text_shift(self, v_bar: Tensor, t_bar: Tensor) -> Tensor:
        """``t_new - t_bar`` for pooled (samples, d) vectors, in the SAE's dtype."""
        cfg, sae, aux = self.config, self.sae, self.sae.aux
        t = t_bar.to(sae.device, sae.dtype)
        v_e, t_e = self.sae_inputs(v_bar, "vision"), self.sae_inputs(t_bar, "text")
        z_v = sae.encode(v_e, "vision", cfg.topk_ties)
        z_t = sae.encode(t_e, "text", cfg.topk_ties)
        z = torch.lerp(z_t, z_v, cfg.beta)
        t_rec = sae.decode(z, "text")
        if aux:
            t_rec = aux.reconstruct(t_rec, "text")
        return cfg.alpha * (t_rec - t)  # (1 - a) t + a t_rec - t


@dataclass
class _Batch:
    """Layer-L bookkeeping of one generate() call, per sample (not per duplicated row)."""

    image_mask: Tensor  # (B, L0) positions of image features in the LM sequence
    text_mask: Tensor  # (B, L0) text positions after the (last) image
    guarded_rows: slice  # rows of the hidden states that get shifted
    v_bar: Tensor | None = None
    sums: Tensor | None = None
    counts: Tensor | None = None

    @property
    def has_image(self) -> Tensor:
        return self.image_mask.any(-1)

    @property
    def t_bar(self) -> Tensor:
        return self.sums / self.counts.clamp_min(1)[:, None]

    def pooled(self) -> tuple[Tensor, Tensor]:
        """``(v_bar, t_bar)`` of the samples with an image: what the SAE encodes."""
        return self.v_bar[self.has_image], self.t_bar[self.has_image]

    def extended(self, length: int) -> tuple[Tensor, Tensor]:
        """Masks for a re-run of the full sequence: generated tokens are text after the image."""
        extra = length - self.image_mask.shape[1]
        if extra < 0:
            raise ValueError(f"layer saw {length} positions, fewer than the prompt's")
        pad = self.has_image[:, None].expand(-1, extra)
        return (
            torch.cat([self.image_mask, torch.zeros_like(pad)], 1),
            torch.cat([self.text_mask, pad], 1),
        )


class PaperState:
    """Applies :class:`PaperIntervention` to layer-L hidden states as generation proceeds."""

    def __init__(self, intervention: PaperIntervention):
        self.intervention = intervention
        self.batch: _Batch | None = None
        self.fused_rows: int | None = None  # set by GuardHandle.generate: B of a 2B batch

    def begin(self, image_mask: Tensor, attention_mask: Tensor | None) -> None:
        """A new prompt: record where the image and the text after it are."""
        positions = torch.arange(image_mask.shape[1], device=image_mask.device)
        last_image = torch.where(image_mask, positions, -1).max(-1).values
        text = (positions > last_image[:, None]) & (last_image[:, None] >= 0)
        if attention_mask is not None:
            text &= attention_mask.bool()
        rows = slice(None)
        if self.fused_rows is not None:
            b = self.fused_rows
            image_mask, text, rows = image_mask[b:], text[b:], slice(b, None)
        self.batch = _Batch(image_mask, text, rows)

    def end(self) -> None:
        self.batch = None

    def __call__(self, hidden: Tensor) -> Tensor | None:
        batch = self.batch
        if batch is None:
            return None
        h = hidden[batch.guarded_rows].float()
        if hidden.shape[1] == 1 and batch.sums is not None:  # cached decoding: one new token
            new = batch.has_image.to(h.dtype)[:, None]
            batch.sums = batch.sums + h[:, 0] * new
            batch.counts = batch.counts + new[:, 0]
            where = batch.has_image[:, None]
        else:  # prompt, or a re-run of the whole sequence (exact mode)
            image_mask, where = batch.extended(hidden.shape[1])
            image = image_mask.to(h.dtype)[..., None]
            text = where.to(h.dtype)[..., None]
            batch.v_bar = (h * image).sum(1) / image.sum(1).clamp_min(1)
            batch.sums = (h * text).sum(1)
            batch.counts = text.sum(1)[:, 0]
        shift = self.intervention.text_shift(batch.v_bar, batch.t_bar).to(h.device)
        shift = shift * batch.has_image[:, None]
        out = hidden.clone()
        out[batch.guarded_rows] += (where[..., None] * shift[:, None, :]).to(hidden.dtype)
        return out


class FusionProcessor:
    """Paper mode's contrastive fusion of plain and guarded logits.

    ``fused = (1 - c_alpha) plain + c_alpha guarded``; tokens whose plain logit is below
    ``log(c_beta) + max(plain)`` are excluded. :meth:`fuse` is the fusion the decoding engine
    calls; calling the object applies it to a doubled batch (rows [:B] plain, rows [B:] guarded)
    in transformers' logits-processor convention and gives both halves the fused scores.
    """

    def __init__(self, c_alpha: float, c_beta: float):
        self.c_alpha = c_alpha
        self.log_c_beta = math.log(c_beta)

    def fuse(self, plain: Tensor, guarded: Tensor, step: int = 0) -> Tensor:
        """(B, vocab) fused scores of one step (the same at every step)."""
        fused = torch.lerp(plain, guarded, self.c_alpha)
        cutoff = plain.max(-1, keepdim=True).values + self.log_c_beta
        return fused.masked_fill(plain < cutoff, float("-inf"))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        b = scores.shape[0] // 2
        fused = self.fuse(scores[:b], scores[b:])
        return torch.cat([fused, fused])
