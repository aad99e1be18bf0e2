"""The fusions of the two-arm peers (VCD, M3ID, PAI): per step, the scores the next token is
chosen from, given arm *a*'s logits (the model as asked) and arm *b*'s (its counterfactual),
both (batch, vocab).

Each method is a frozen settings model holding its paper's and released code's defaults, and a
pure function of ``(logits_a, logits_b, step)``; ``settings.fuse`` binds the settings, so the
decoding engine calls ``fuse(logits_a, logits_b, step)``. Tokens cut by a plausibility
constraint score ``-inf``. Scores are float32 whatever the arms' dtype (the released codes fuse
fp16 logits; float32 keeps the cutoff from rounding a token in or out). Temperature, top-k and
top-p come after the fusion, as in the released codes. The arms' counterfactual inputs are in
:mod:`vlsae_guard.decoding.counterfactuals`.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from ..validation import FrozenSettings


def _check(logits_a: torch.Tensor, logits_b: torch.Tensor, step: int) -> None:
    if logits_a.ndim != 2 or logits_a.shape != logits_b.shape:
        raise ValueError(
            "the two arms' logits must both be (batch, vocab): found "
            f"{tuple(logits_a.shape)} and {tuple(logits_b.shape)}"
        )
    if step < 0:
        raise ValueError(f"step counts the tokens generated so far: expected >= 0, found {step}")


def plausible(logits_a: torch.Tensor, beta: float) -> torch.Tensor:
    """The adaptive plausibility constraint (Li et al. 2023, used by VCD): keep token *i* where
    ``p_a(i) >= beta * max_j p_a(j)``, *p_a* the softmax of arm *a*'s raw logits.

    Computed, as DAMO-NLP-SG/VCD ``vcd_utils/vcd_sample.py`` does ("version 2"), as
    ``logit_a(i) >= log(beta) + max_j logit_a(j)``: the same set (the softmax's normaliser
    cancels in the ratio) without exponentiating.
    """
    logits = logits_a.float()
    cutoff = math.log(beta) + logits.max(dim=-1, keepdim=True).values
    return logits >= cutoff


class VCDSettings(FrozenSettings):
    """Visual Contrastive Decoding: Leng et al., "Mitigating Object Hallucinations in Large
    Vision-Language Models through Visual Contrastive Decoding", CVPR 2024; code
    DAMO-NLP-SG/VCD.

    Defaults are the released evaluation's: ``experiments/eval/object_hallucination_vqa_llava.py``
    has ``--cd_alpha 1``, ``--cd_beta 0.1``, ``--noise_step 500`` (of 1000 steps).
    Its POPE script ``experiments/cd_scripts/llava1.5_pope.bash``
    passes ``cd_beta 0.2`` (seed 55); ``vcd_sample.py``'s own fallbacks (α 0.5, β 0.1) apply
    only when the caller passes nothing, which the scripts never do. ``noise_seed`` is ours:
    the released code draws the noise from the global RNG after ``set_seed``.
    """

    alpha: float = Field(1.0, ge=0.0, description="contrast strength; 0 is plain decoding")
    beta: float = Field(0.1, gt=0.0, le=1.0, description="plausibility cutoff, relative to max p")
    noise_step: int = Field(500, ge=0, lt=1000, description="diffusion step of the noised image")
    noise_seed: int = Field(0, ge=0, description="seed of the image noise")

    def fuse(self, logits_a: torch.Tensor, logits_b: torch.Tensor, step: int) -> torch.Tensor:
        return vcd_fuse(logits_a, logits_b, step, self)


def vcd_fuse(
    logits_a: torch.Tensor, logits_b: torch.Tensor, step: int, settings: VCDSettings
) -> torch.Tensor:
    """``(1 + alpha) * logit_a - alpha * logit_b`` on the tokens :func:`plausible` keeps under
    arm *a*, ``-inf`` elsewhere (VCD's Eq. 4 with the constraint of its Eq. 5 and 6).

    Follows ``vcd_utils/vcd_sample.py``: raw logits (not log-probabilities) are contrasted, the
    cutoff is on arm *a*'s raw logits, ``step`` is unused (VCD's weight is constant).
    Deviation: float32 arithmetic (see the module).
    """
    _check(logits_a, logits_b, step)
    a, b = logits_a.float(), logits_b.float()
    diffs = (1.0 + settings.alpha) * a - settings.alpha * b
    return diffs.masked_fill(~plausible(a, settings.beta), -math.inf)


class M3IDSettings(FrozenSettings):
    """Multi-Modal Mutual-Information Decoding: Favero et al., "Multi-Modal Hallucination Control
    by Visual Information Grounding", CVPR 2024 (arXiv 2403.14003). No official code is
    released; the fusion, ``lam = 0.02`` and the plausibility cutoff ``beta = 0.1`` follow the
    M3ID baseline of sangminwoo/AvisC (``avisc_utils/avisc_sample.py``), the public
    reimplementation that papers compare against.
    """

    lam: float = Field(0.02, ge=0.0, description="rate at which the image's weight grows")
    beta: float = Field(0.1, gt=0.0, le=1.0, description="plausibility cutoff, relative to max p")

    def fuse(self, logits_a: torch.Tensor, logits_b: torch.Tensor, step: int) -> torch.Tensor:
        return m3id_fuse(logits_a, logits_b, step, self)


def m3id_weight(step: int, lam: float) -> float:
    """``(1 - gamma_t) / gamma_t`` with ``gamma_t = exp(-lam * t)``, ``t = step + 1``.

    ``step`` counts the tokens generated before this one, so the first new token has t = 1 (as
    AvisC's counter does). Written ``expm1(lam * t)``, which equals it exactly and keeps
    precision for small ``lam * t``.
    """
    if step < 0:
        raise ValueError(f"step counts the tokens generated so far: expected >= 0, found {step}")
    return math.expm1(lam * (step + 1))


def m3id_fuse(
    logits_a: torch.Tensor, logits_b: torch.Tensor, step: int, settings: M3IDSettings
) -> torch.Tensor:
    """``l_c + w_t * (l_c - l_u)`` on the tokens :func:`plausible` keeps under arm *a*, ``-inf``
    elsewhere; ``l_c``, ``l_u`` the log-softmax of arm *a* (with the image) and arm *b* (without
    it), ``w_t`` :func:`m3id_weight`: the image's pull grows with the generated length, against
    the paper's "conditioning dilution".

    Deviations: we could read AvisC's code but not the paper's full text, so any rule the paper
    adds beyond this formula (e.g. a confidence threshold) is not applied; the cutoff is VCD's
    (AvisC's choice); float32 arithmetic.
    """
    _check(logits_a, logits_b, step)
    a = logits_a.float()
    log_c = torch.log_softmax(a, dim=-1)
    log_u = torch.log_softmax(logits_b.float(), dim=-1)
    fused = log_c + m3id_weight(step, settings.lam) * (log_c - log_u)
    return fused.masked_fill(~plausible(a, settings.beta), -math.inf)


class PAISettings(FrozenSettings):
    """Paying More Attention to Image: Liu, Zheng and Chen, "Paying More Attention to Image: A
    Training-Free Method for Alleviating Hallucination in LVLMs", ECCV 2024 (arXiv 2407.21771);
    code LALBJ/PAI. Two parts: arm *a*'s attention to the image is amplified
    (:mod:`vlsae_guard.methods.pai`: ``alpha`` and the layers), and the next-token scores
    contrast arm *a* with the prompt without its image (:func:`pai_fuse`: ``gamma``, ``beta``).

    Defaults are the released evaluation commands' (README: ``--alpha 0.2 --gamma 1.1
    --start-layer 2 --end-layer 32`` for POPE and CHAIR; the scripts' argparse default of
    ``gamma`` is 2, which those commands override). ``beta`` is hard-coded in ``CFG.py``
    (``log(0.1)``). Deviation: ``end_layer`` None means through the last layer, which on
    LLaVA-1.5-7B (32 layers) is the released ``--end-layer 32``; on deeper models (13B: 40) pass
    ``end_layer=32`` to reproduce the released scripts exactly.
    """

    alpha: float = Field(0.2, ge=0.0, description="image-attention amplification; 0: none")
    gamma: float = Field(1.1, ge=1.0, description="guidance scale against the text-only arm")
    beta: float = Field(0.1, gt=0.0, le=1.0, description="plausibility cutoff, relative to max p")
    start_layer: int = Field(2, ge=0, description="first decoder layer amplified (0-based)")
    end_layer: int | None = Field(None, ge=1, description="layers amplified end here (excluded)")

    @model_validator(mode="after")
    def _layers_in_order(self) -> PAISettings:
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(
                f"end_layer ({self.end_layer}) must exceed start_layer ({self.start_layer})"
            )
        return self

    def layers(self, count: int) -> range:
        """The indices of the amplified layers in a model with ``count`` decoder layers;
        ValueError where the range names layers the model lacks or none at all."""
        end = count if self.end_layer is None else self.end_layer
        if end > count or self.start_layer >= end:
            raise ValueError(
                f"layers {self.start_layer} .. {end - 1} are asked for, and the model has "
                f"{count} decoder layers (0 .. {count - 1}); set start_layer / end_layer"
            )
        return range(self.start_layer, end)

    def fuse(self, logits_a: torch.Tensor, logits_b: torch.Tensor, step: int) -> torch.Tensor:
        return pai_fuse(logits_a, logits_b, step, self)


def pai_fuse(
    logits_a: torch.Tensor, logits_b: torch.Tensor, step: int, settings: PAISettings
) -> torch.Tensor:
    """``gamma * (l_a - l_b) + l_b`` on the tokens :func:`plausible` keeps under ``l_a``,
    ``-inf`` elsewhere; ``l_a``, ``l_b`` the log-softmax of arm *a* (the image, its attention
    amplified) and arm *b* (the prompt without its image). With ``gamma == 1`` the scores are
    ``l_a`` with no cutoff.

    Follows LALBJ/PAI ``CFG.py`` (``CFGLogits``, a logits processor that generate() runs before
    its sampling warpers): log-softmaxes, not raw logits, are contrasted; the cutoff compares
    ``l_a`` with ``log(beta) + max l_a``; ``gamma == 1`` returns ``l_a`` unchanged; ``step`` is
    unused. Deviation: float32 arithmetic (see the module).
    """
    _check(logits_a, logits_b, step)
    log_a = torch.log_softmax(logits_a.float(), dim=-1)
    if settings.gamma == 1.0:
        return log_a
    log_b = torch.log_softmax(logits_b.float(), dim=-1)
    fused = settings.gamma * (log_a - log_b) + log_b
    return fused.masked_fill(~plausible(log_a, settings.beta), -math.inf)


FUSIONS: dict[str, type[VCDSettings] | type[M3IDSettings] | type[PAISettings]] = {
    "vcd": VCDSettings,
    "m3id": M3IDSettings,
    "pai": PAISettings,
}
"""Settings model by method name; ``FUSIONS[name](**flags).fuse`` is the method's fusion."""
