"""Pydantic configs for what crosses a boundary: checkpoints on disk.

Every config forbids unknown fields so a typo in a hand-edited ``config.json`` fails loudly
instead of silently falling back to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..validation import FrozenRecord

Architecture = Literal["vl-sae", "sae-v", "sae-d", "batchtopk", "matryoshka"]
# One encoder and one decoder read by a single modality: the vision-encoder SAEs of "Sparse
# Autoencoders Learn Monosemantic Features in Vision-Language Models" (Pach et al., 2025).
VISION_ONLY: tuple[Architecture, ...] = ("batchtopk", "matryoshka")
SiteName = Literal["projector", "layer", "vision_tower"]
Modality = Literal["vision", "text"]
MODALITIES: tuple[Modality, ...] = ("vision", "text")
Point = Literal["input", "output"]


def layer_site(layer: int, point: Point | None) -> str:
    """A decoder layer's ``point`` named as ``collect`` names sites: ``layer:L`` is the input
    of layer L, so its output is ``layer:L+1`` (the same residual-stream tensor)."""
    return f"layer:{layer + (point == 'output')}"


def vision_tower_layer(site: str) -> int | None:
    """L of a ``vision_tower:L`` site name, None for ``projector``; anything else is refused."""
    if site == "projector":
        return None
    name, _, layer = site.partition(":")
    if name != "vision_tower" or not layer.isdigit():
        raise ValueError(
            f"site {site!r}: expected 'projector' or 'vision_tower:L' (L: the vision encoder's "
            "layer whose output is rewritten, e.g. vision_tower:22 for LLaVA-1.5)"
        )
    return int(layer)


class Source(FrozenRecord):
    """Where the training representations came from (so a checkpoint is never applied blindly)."""

    model_id: str | None = None
    site: SiteName | None = None  # None: unknown (e.g. imported)
    # Site "layer": the language model's decoder layer; "vision_tower": the vision encoder's.
    layer: int | None = Field(default=None, ge=0)
    # Site "layer": read at the input or the output of that layer (``collect`` reads the
    # input). None: not recorded (checkpoints written before it was, imported ones).
    point: Point | None = None
    pooling: Literal["token", "mean"] = "token"

    @model_validator(mode="after")
    def _layer_matches_site(self) -> Source:
        if self.site in ("layer", "vision_tower") and self.layer is None:
            raise ValueError(f"site {self.site!r} needs a layer index")
        if self.site == "projector" and self.layer is not None:
            raise ValueError(f"site 'projector' takes no layer index (got layer={self.layer})")
        if self.point is not None and self.site != "layer":
            raise ValueError(f"point applies to site 'layer' only (got site={self.site!r})")
        return self

    @property
    def place(self) -> str | None:
        """Where the states were read, as ``collect`` names it (``projector``, ``layer:L``,
        ``vision_tower:L``); a decoder layer without a recorded point is taken as its input,
        where ``collect`` reads; a vision-tower layer is always read at its output."""
        if self.site == "vision_tower":
            return f"vision_tower:{self.layer}"
        if self.site != "layer":
            return self.site
        return layer_site(self.layer, self.point)


class AuxConfig(FrozenRecord):
    """The paper's auxiliary alignment autoencoder: Linear(d -> p) per modality and back."""

    d_vision: int = Field(gt=0)
    d_text: int = Field(gt=0)
    d_proj: int = Field(gt=0)


class SAEConfig(FrozenRecord):
    """Everything needed to rebuild a sparse autoencoder and to know what it was trained on."""

    format_version: Literal[1] = 1
    architecture: Architecture = "vl-sae"
    d_in: int = Field(gt=0)
    n_concepts: int = Field(gt=0)
    k: int = Field(ge=1)
    source: Source = Source()
    aux: AuxConfig | None = None
    # Matryoshka: the nested groups' sizes (concepts [0, g1) first, then [g1, g1 + g2), ...);
    # a prefix of groups is a smaller SAE on its own. Sums to n_concepts.
    groups: list[int] | None = None
    # Concepts that fire for both modalities on the training data; the guard keeps only these.
    shared_concepts: list[int] | None = None
    # Training statistics (explained variance, L0, dead fraction, ...), informational.
    stats: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_ranges(self) -> SAEConfig:
        if self.k > self.n_concepts:
            raise ValueError(f"k must be <= n_concepts ({self.n_concepts}), got k={self.k}")
        if self.shared_concepts is not None:
            bad = [c for c in self.shared_concepts if not 0 <= c < self.n_concepts]
            if bad:
                raise ValueError(
                    f"shared_concepts must lie in [0, {self.n_concepts}), found {bad[:5]}"
                )
            if len(set(self.shared_concepts)) != len(self.shared_concepts):
                raise ValueError("shared_concepts contains duplicates")
        if (self.architecture == "matryoshka") != (self.groups is not None):
            raise ValueError(
                "groups (the nested group sizes) are given for, and only for, "
                f"architecture 'matryoshka' (architecture {self.architecture!r})"
            )
        if self.groups is not None and (
            sum(self.groups) != self.n_concepts or min(self.groups) < 1
        ):
            raise ValueError(
                f"groups must be positive sizes summing to n_concepts ({self.n_concepts}), "
                f"got {self.groups}"
            )
        if self.architecture in VISION_ONLY and (self.aux or self.shared_concepts is not None):
            raise ValueError(
                f"architecture {self.architecture!r} reads one modality: it has no auxiliary "
                "AE and no concepts shared with text"
            )
        if self.aux is not None and self.aux.d_proj != self.d_in:
            raise ValueError(
                f"aux.d_proj ({self.aux.d_proj}) must equal d_in ({self.d_in}): "
                "the SAE reads the auxiliary projection"
            )
        return self
