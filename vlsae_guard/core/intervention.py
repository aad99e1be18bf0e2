"""What the guard does to image-feature tokens, independent of any serving stack.

Backends (``vlsae_guard.backends``) find the projector and say which sample each projected
image row belongs to; this module turns projector outputs into guarded outputs. vLLM's plugin
calls the same :class:`ProjectorIntervention`, so there is one implementation of the math.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from ..validation import FrozenSettings
from .sae import Codes, SparseAutoencoder, TopKTies
from .sae_config import vision_tower_layer
from .screen import ScreenedSearch

# |steer value| bound: concept activations of real SAEs are O(1-100); the bound keeps a typo
# (1e308) from overflowing to inf in the SAE's dtype and emptying every answer.
MAX_STEER = 1e4


class GuardConfig(FrozenSettings):
    """Guard settings, validated before anything touches the model.

    Every number must be finite (NaN and inf are refused on every path: Python, flags, serving)
    and within the range its field states.
    """

    # projector: rewrite the image tokens; paper: the VL-SAE paper's layer-L inference;
    # cue-mask: the asked object's cues masked in the image tokens (:mod:`.cue_mask`).
    mode: Literal[GUARD_MODES] = "projector"
    # Strength; by mode: projector 0.5, paper 0.8 (the paper's POPE setting; 0.7 for CHAIR);
    # cue-mask has none (0).
    alpha: float = Field(ge=0.0, le=1.0)  # filled by _default_alpha when not given

    # -- projector mode ---------------------------------------------------------------------
    # How the image tokens are rewritten (called ``method`` before 0.2; ``method`` now names the
    # inference method, e.g. none / paper / vcd, as issues and papers do):
    # replace: v' = (1 - alpha) v + alpha D(z * 1_S);  edit: v' = v + alpha (D(z * 1_S) - D(z)).
    rewrite: Literal["replace", "edit"] = "replace"
    # Further restrict S per sample to the concepts the prompt's own text tokens activate.
    text_grounded: bool = False
    # Override the checkpoint's shared-concept set.
    shared_concepts: list[int] | None = None
    # Clamp concepts on the vision tokens: {concept index: activation value in +-MAX_STEER}.
    steer: dict[int, float] = Field(default_factory=dict)
    # Where: the projector's output, or ``vision_tower:L``, the output of the vision encoder's
    # layer L (the vision-encoder SAEs of Pach et al., 2025; :mod:`.vision_tower`), where the
    # tokens become the SAE's reconstruction with ``steer``'s concepts clamped.
    site: str = "projector"
    # vision_tower: zero every other concept before clamping (the paper's ``pre_zero``) ...
    pre_zero: bool = False
    # ... and add back the SAE's error x - D(E(x)), so only the clamps change the tokens.
    keep_error: bool = False
    # How each image token's top-k concepts are found: "full" (every cosine in the SAE's
    # dtype) or "screened" (every cosine in bfloat16 first, a certified bound picking the few
    # recomputed in float32: the same answer, faster where bfloat16 is; :mod:`.screen`).
    search: Literal["full", "screened"] = "full"

    # -- paper mode (decoder layer L, the VL-SAE paper's inference) ---------------------------
    layer: int | None = Field(default=None, ge=0)
    point: Literal["input", "output"] = "output"
    beta: float = Field(default=0.9, ge=0.0, le=1.0)
    c_alpha: float = Field(default=0.6, ge=0.0, le=1.0)
    c_beta: float = Field(default=0.8, gt=0.0, le=1.0)
    # Recompute the whole sequence every step (the official code's semantics, slow).
    exact: bool = False
    # The SAE's (and auxiliary AE's) compute dtype; None: as loaded (float32 from a checkpoint).
    # The official scripts run both in float16.
    sae_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    # TopK at a tie on the k-th activation: "keep-k" keeps k (torch.topk picks among the tied);
    # "official" keeps those strictly above the (n - k)-th smallest, as the released code does,
    # so a tie at the boundary drops all its members (fewer than k; frequent in float16).
    topk_ties: TopKTies = "keep-k"

    # -- cue-mask mode ------------------------------------------------------------------------
    # The object map (``objects.json``, :class:`~vlsae_guard.core.object_evidence.ObjectConcepts`);
    # None: the one in the SAE checkpoint's directory.
    objects: str | None = None
    # A cue counts as in the image where its evidence reaches what this share of held-out images
    # holding it reach.
    recall_floor: float = Field(default=0.9, gt=0.0, lt=1.0)
    # c is a cue of o where captions name o with c this often (P(o | c)) ...
    min_conditional: float = Field(default=0.8, gt=0.0, le=1.0)
    # ... and this many times o's base rate.
    min_lift: float = Field(default=1.5, ge=1.0)
    # Tokens masked: the cue's token evidence above this share of the image's largest (0: any).
    token_share: float = Field(default=0.0, ge=0.0, lt=1.0)
    # What a masked token becomes: the SAE's concept-free token (its vision decoder's bias), or
    # the mean of the image's own unmasked tokens (its background, as an image without the cue).
    fill: Literal["concept-free", "background"] = "concept-free"

    @model_validator(mode="before")
    @classmethod
    def _default_alpha(cls, data):
        if isinstance(data, dict):
            data = rename_deprecated_method(data)
            data = _mode_from_method(data)
            if data.get("alpha") is None:
                default = {"paper": 0.8, "cue-mask": 0.0}.get(data.get("mode"), 0.5)
                if data.get("site", "projector") != "projector":
                    default = 0.0  # the vision tower's rewrite has no strength
                data = {**data, "alpha": default}
        return data

    @field_validator("site")
    @classmethod
    def _site(cls, site: str) -> str:
        layer = vision_tower_layer(site)
        return site if layer is None else f"vision_tower:{layer}"

    @property
    def vision_layer(self) -> int | None:
        """L of site ``vision_tower:L``; None at the projector."""
        return vision_tower_layer(self.site)

    @model_validator(mode="after")
    def _check_mode(self) -> GuardConfig:
        for name, ids in (("steer", list(self.steer)), ("shared_concepts", self.shared_concepts)):
            bad = [c for c in ids or () if c < 0]
            if bad:
                raise ValueError(f"{name}: concept indices must be >= 0, got {bad[:5]}")
        big = {c: v for c, v in self.steer.items() if abs(v) > MAX_STEER}
        if big:
            raise ValueError(
                f"steer: values must be within +-{MAX_STEER:g} (concept activations), got "
                f"{dict(list(big.items())[:5])}"
            )
        wrong = [n for n in _ONLY[self.mode] if n in self.model_fields_set]
        if self.mode != "projector":  # given at their defaults (False, None, {}) is fine
            wrong = [n for n in wrong if n not in _PROJECTOR] + [
                n for n in _PROJECTOR[1:] if getattr(self, n)
            ]
        if self.mode == "cue-mask" and self.alpha:
            wrong.append("alpha")
        if self.mode == "projector" and self.site == "projector":
            wrong += [n for n in _VISION_TOWER if getattr(self, n)]
        if wrong:
            raise ValueError(f"{wrong} do not apply to mode {self.mode!r} at site {self.site!r}")
        if self.site != "projector":
            wrong = [n for n in _PROJECTOR[:3] if n in self.model_fields_set]
            wrong += ["alpha"] * bool(self.alpha) + ["mode"] * (self.mode != "projector")
            if wrong:
                raise ValueError(
                    f"{wrong} do not apply at site {self.site!r}: there the tokens become the "
                    "SAE's reconstruction, with steer, pre_zero and keep_error"
                )
        if self.search != "full" and (self.mode != "projector" or self.site != "projector"):
            raise ValueError(
                f"search={self.search!r} applies to mode 'projector' at site 'projector' (the "
                f"image tokens' top-k), not to mode {self.mode!r} at site {self.site!r}"
            )
        if self.mode == "paper" and self.layer is None:
            raise ValueError("mode 'paper' needs layer=L (the decoder layer to hook)")
        return self

    @property
    def is_identity(self) -> bool:
        """True when the hook would change nothing, so it is skipped (bit-exact outputs)."""
        if self.site != "projector":
            return self.keep_error and not self.pre_zero and not self.steer
        return self.mode != "cue-mask" and self.alpha == 0.0 and not self.steer


GUARD_MODES = ("projector", "paper", "cue-mask")
_PAPER = ("layer", "point", "beta", "c_alpha", "c_beta", "exact", "sae_dtype", "topk_ties")
_CUES = ("objects", "recall_floor", "min_conditional", "min_lift", "token_share", "fill")
_PROJECTOR = ("rewrite", "text_grounded", "shared_concepts", "steer")
_VISION_TOWER = ("pre_zero", "keep_error")  # besides steer; only at site vision_tower:L
_ONLY = {  # the fields a mode refuses when they are given
    "projector": _PAPER + _CUES,
    "paper": _PROJECTOR + _CUES + _VISION_TOWER,
    "cue-mask": _PAPER + _PROJECTOR + _VISION_TOWER,
}
REWRITES = ("replace", "edit")
# guard(..., method=...): the inference method's name for each guard mode
METHOD_MODES = {"vlsae": "projector", "paper": "paper", "cue-mask": "cue-mask"}


def _mode_from_method(settings: dict) -> dict:
    """``method="vlsae" | "paper" | "cue-mask"`` (the inference method's name) -> ``mode``."""
    if settings.get("method") not in METHOD_MODES:
        if "method" in settings:
            raise ValueError(
                f"method {settings['method']!r}: guard() runs {', '.join(METHOD_MODES)} "
                "(the others attach with vlsae_guard.methods.attach)"
            )
        return settings
    mode = METHOD_MODES[settings["method"]]
    if settings.get("mode", mode) != mode:
        method, given = settings["method"], settings["mode"]
        raise ValueError(f"method {method!r} runs mode {mode!r}, not {given!r}")
    rest = {k: v for k, v in settings.items() if k != "method"}
    return {**rest, "mode": mode}


def rename_deprecated_method(settings: dict) -> dict:
    """``method="replace"|"edit"`` (before 0.2) -> ``rewrite=...``, with a FutureWarning (shown
    to command-line users too, unlike DeprecationWarning).

    Only those two values move: ``method`` is the inference method's name from now on.
    """
    if settings.get("method") not in REWRITES:
        return settings
    if settings.get("rewrite") is not None:
        raise ValueError("give rewrite= only (method='replace'/'edit' is its deprecated name)")
    warnings.warn(
        f"method={settings['method']!r} is deprecated: the projector rewrite is now "
        f"rewrite={settings['method']!r} ('method' names the inference method)",
        FutureWarning,
        stacklevel=4,
    )
    rest = {k: v for k, v in settings.items() if k not in ("method", "rewrite")}
    return {**rest, "rewrite": settings["method"]}


class ProjectorIntervention:
    """Rewrites projected image tokens through the SAE's shared concepts.

    ``shared`` is a bool mask over concepts (S). ``text_masks`` (optional, one row per sample)
    further restricts S per sample; ``owners`` maps each token row to its sample.
    """

    def __init__(self, sae: SparseAutoencoder, config: GuardConfig, shared: Tensor):
        self.sae = sae
        self.config = config
        self.shared = shared.to(sae.device)
        self._steer_idx, self._steer_val = steer_tensors(config.steer, sae)
        self.search = ScreenedSearch(sae) if config.search == "screened" else None

    @classmethod
    def build(cls, sae: SparseAutoencoder, config: GuardConfig) -> ProjectorIntervention:
        """Validate the settings against the SAE and resolve the shared set S."""
        n = sae.config.n_concepts
        check_concept_range((config.shared_concepts or []) + list(config.steer), n)
        ids = config.shared_concepts
        if ids is None:
            ids = sae.config.shared_concepts
        shared = torch.zeros(n, dtype=torch.bool)
        if ids is None:
            warnings.warn(
                "the SAE checkpoint has no shared-concept set and none was given: using all "
                "concepts (the guard then only filters through the SAE's reconstruction)",
                stacklevel=3,
            )
            shared[:] = True
        else:
            shared[ids] = True
        return cls(sae, config, shared)

    def text_concepts(self, text_embeds: list[Tensor]) -> Tensor:
        """Per-sample bool masks of the concepts that a sample's text tokens activate."""
        masks = torch.zeros(len(text_embeds), self.sae.n_concepts, dtype=torch.bool)
        masks = masks.to(self.sae.device)
        for i, emb in enumerate(text_embeds):
            if emb.numel():
                idx = self.sae.encode_topk(emb.to(self.sae.device), "text").indices
                masks[i, idx.reshape(-1)] = True
        return masks

    def keep(
        self, codes: Codes, owners: Tensor | None = None, text_masks: Tensor | None = None
    ) -> Tensor:
        """Per row and TopK slot: is that concept kept (in S, and in the row's sample's text
        mask when given)? What the guard drops is the rest; ``inspect`` shows the same split."""
        keep = self.shared[codes.indices]
        if text_masks is not None:
            if owners is None:
                raise ValueError("text-grounded guarding needs the owner sample of each row")
            rows = text_masks[owners.reshape(-1).to(text_masks.device)]
            keep = keep & rows.gather(-1, codes.indices)
        return keep

    @torch.no_grad()
    def __call__(
        self, feats: Tensor, owners: Tensor | None = None, text_masks: Tensor | None = None
    ) -> Tensor:
        """Guard ``feats`` (..., d); ``owners`` gives the sample of each row of ``feats``."""
        cfg = self.config
        shape, dtype = feats.shape, feats.dtype
        x = feats.reshape(-1, shape[-1]).to(self.sae.device, self.sae.dtype)
        if self.search is None:
            codes = self.sae.encode_topk(x, "vision")
        else:
            codes = self.search.encode_topk(x)
        decoder = self.sae.decoder_for("vision")
        out = x
        if cfg.alpha:
            keep = self.keep(codes, owners, text_masks)
            if cfg.rewrite == "replace":
                kept = Codes(codes.values * keep, codes.indices, codes.n_concepts)
                out = torch.lerp(x, decoder.sparse(kept), cfg.alpha)
            else:
                dropped = Codes(codes.values * ~keep, codes.indices, codes.n_concepts)
                out = x - cfg.alpha * decoder.sparse(dropped, bias=False)
        if cfg.steer:
            out = out + steer_delta(codes, decoder.weight, self._steer_idx, self._steer_val)
        return out.to(feats.device, dtype).reshape(shape)


def check_concept_range(ids: list[int], n: int) -> None:
    """Refuse concept indices an SAE with ``n`` concepts does not have (:class:`ValueError`)."""
    out_of_range = [c for c in ids if c >= n]
    if out_of_range:
        raise ValueError(
            f"concept indices {out_of_range[:5]} are out of range for an SAE with {n} concepts"
        )


def steer_tensors(steer: dict[int, float], sae: SparseAutoencoder) -> tuple[Tensor, Tensor]:
    """The clamped concepts and their values, on the SAE's device and in its dtype."""
    index = torch.tensor(list(steer), dtype=torch.long, device=sae.device)
    return index, torch.tensor(list(steer.values()), dtype=sae.dtype, device=sae.device)


def steer_delta(codes: Codes, weight: Tensor, index: Tensor, value: Tensor) -> Tensor:
    """``sum_j (s_j - z_j) w_j``: clamps concept ``index[i]`` to ``value[i]``, every other
    concept untouched (``weight``: the decoder's rows)."""
    hit = codes.indices.unsqueeze(-1) == index  # (rows, k, n_steer)
    current = (codes.values.unsqueeze(-1) * hit).sum(-2)  # (rows, n_steer)
    return (value - current) @ weight[index]
