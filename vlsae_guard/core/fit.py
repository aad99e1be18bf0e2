"""How well an SAE fits where it is used: explained variance, and the placement check.

Metadata cannot show that a checkpoint fits the site it is used at (an imported one records no
site; the released VL-SAE was trained on mean-pooled layer-30 states), so ``guard()`` measures the
SAE's explained variance on its first guarded batch (:class:`GuardFit`, ``handle.fit``); training
reports the same quantity from the same sums (:class:`Moments`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..validation import FrozenRecord
from .sae import SparseAutoencoder
from .sae_config import Modality, Point


class Moments:
    """Sums that give explained variance, also after an all-reduce (training sums them over
    ranks): n, sum |x|^2, SSE, sum x."""

    def __init__(self, d: int, device: torch.device):
        self.sums = torch.zeros(d + 3, dtype=torch.float64, device=device)

    def add(self, x: Tensor, recon: Tensor) -> None:
        x64 = x.double()
        self.sums[0] += len(x)
        self.sums[1] += x64.pow(2).sum()
        self.sums[2] += (x64 - recon.double()).pow(2).sum()
        self.sums[3:] += x64.sum(0)

    def explained_variance(self) -> float:
        n, sq, sse, total = self.sums[0], self.sums[1], self.sums[2], self.sums[3:]
        variance = sq - total.pow(2).sum() / n.clamp_min(1)
        return float(1 - sse / variance.clamp_min(1e-30))

    def mse(self, d: int) -> float:
        return float(self.sums[2] / (self.sums[0].clamp_min(1) * d))


# Explained variance of the vision vectors below which the first guarded batch warns (strict:
# refuses). Measured on the CPU testbed (benchmarks/testbed.py, seed 0, batches of 1, 4 and 16
# validation prompts): SAEs in place explain 0.70 to 0.79 (SAE settings trained 40 epochs) and
# -0.15 to 0.29 (--fast, 2 epochs); misplaced ones -0.71 to -3.9 (the layer SAE read one layer
# off), -2.7 to -4.3 (random weights), -4.1 to -6.3 (the layer SAE at the projector), -12 to
# -15.5 (the projector SAE at the layer). The tests' 4-epoch projector SAE explains -0.41 of one
# image's tokens. Text is recorded, not checked: a batch's questions differ by a word or two, so
# their variance (the denominator) is small: paper mode in place explains -2.8 to -4.9 of them
# (-5.1 to -11 with --fast).
DEFAULT_MIN_FIT = -0.5


class GuardFitWarning(UserWarning):
    """The SAE may not suit the site in use (see :attr:`GuardFit.problem`)."""


class GuardFit(FrozenRecord):
    """The SAE's explained variance where it is used, from the first guarded batch.

    Explained variance is the training code's: ``1 - sum|x - x_hat|^2 / sum|x - mean x|^2`` over
    the vectors the SAE encodes, in its input space: the projector's image tokens (and, text-
    grounded, the prompt's text embeddings); in paper mode the pooled image and text states of
    each sample. ``None``: the mode does not encode that modality, or the batch held fewer than
    two distinct vectors of it (one sample in paper mode): no variance to explain.

    Sites are named as ``collect`` names them: ``layer:L`` is the input of decoder layer L, so
    paper mode at ``layer=L`` reads ``layer:L+1`` with ``point="output"`` (the default), and a
    checkpoint trained at the output of layer L (``Source.point``) at ``layer:L+1`` too. Sites
    that differ are the one placement problem, said once, naming both points.
    """

    site: str  # where the guard reads: "projector" or "layer:L"
    trained_site: str | None  # the checkpoint's source; None where it records none (imported)
    trained_pooling: Literal["token", "mean"]
    point: Point | None = None  # paper mode: the guard hooks the input or output of its layer
    trained_point: Point | None = None  # the checkpoint's Source.point (None: not recorded)
    explained_variance_vision: float | None
    explained_variance_text: float | None
    vision_vectors: int  # tokens, or pooled samples in paper mode
    text_vectors: int
    min_fit: float

    @property
    def problem(self) -> str | None:
        """Why the SAE may not suit this site: its checkpoint names another, or its vision fit
        is below ``min_fit`` or could not be measured. None when neither."""
        pooled = " on mean-pooled states" if self.trained_pooling == "mean" else ""
        trained = f"trained at {self.trained_site or 'an unrecorded site'}{pooled}"
        ev = self.explained_variance_vision
        problems = []
        if self.trained_site is not None and self.trained_site != self.site:
            reads = _place(self.site, self.point)
            was = _place(self.trained_site, self.trained_point, "taken as its input")
            problems.append(f"the SAE reads {reads} but was trained at {was}{pooled}")
            trained = ""  # said once
        if ev is None:
            problems.append(
                f"its fit at {self.site} could not be measured on the first guarded batch (fewer "
                "than two distinct vision vectors; paper mode pools each sample to one)"
            )
        elif ev < self.min_fit:
            problems.append(
                f"it explains {ev:.3f} of the variance of the vision vectors it reads at "
                f"{self.site}, below min_fit={self.min_fit:g}"
                + (f" ({trained})" if trained else "")
                + ": trained for another site or model, or undertrained, it rewrites tokens it "
                "cannot represent"
            )
        return "; ".join(problems) or None

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def _place(site: str, point: Point | None, unknown: str | None = None) -> str:
    """``layer:31 (the output of decoder layer 30)``; without a point, what ``unknown`` says."""
    if not site.startswith("layer:") or (point is None and unknown is None):
        return site
    index = int(site.split(":")[1])
    if point is None:
        return f"{site} (decoder layer {index}, point not recorded: {unknown})"
    return f"{site} (the {point} of decoder layer {index - (point == 'output')})"


def explained_variance(sae: SparseAutoencoder, x: Tensor, modality: Modality) -> float | None:
    """Of ``sae`` on the rows of ``x`` (its input space); None without two distinct rows."""
    x = x.reshape(-1, x.shape[-1]).to(sae.device, sae.dtype)
    if not bool((x != x[:1]).any()):
        return None
    moments = Moments(x.shape[-1], x.device)
    moments.add(x, sae.decode(sae.encode_topk(x, modality), modality))
    return moments.explained_variance()


@torch.no_grad()
def measure_fit(
    sae: SparseAutoencoder,
    site: str,
    min_fit: float,
    vision: Tensor,
    text: Tensor | None = None,
    point: Point | None = None,
) -> GuardFit:
    """:class:`GuardFit` of ``sae`` on ``vision`` (and ``text``) rows read at ``site`` (in
    paper mode at ``point`` of its layer)."""
    source = sae.config.source
    return GuardFit(
        site=site,
        trained_site=source.place,
        trained_pooling=source.pooling,
        point=point,
        trained_point=source.point,
        explained_variance_vision=explained_variance(sae, vision, "vision"),
        explained_variance_text=None if text is None else explained_variance(sae, text, "text"),
        vision_vectors=vision.numel() // vision.shape[-1],
        text_vectors=0 if text is None else text.numel() // text.shape[-1],
        min_fit=min_fit,
    )
