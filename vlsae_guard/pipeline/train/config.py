"""Settings of ``vlsae-guard train``; defaults are the VL-SAE paper's where it states them.

The resolved config is written next to the checkpoint (``training.json``), so a checkpoint
always says how it was made. A resumed run must use the same settings except the ones in
:data:`RESUME_MAY_CHANGE`. Settings that cannot train on a store raise :class:`TrainError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ...core.sae_config import Architecture, AuxConfig, SAEConfig, Source
from ...validation import Settings

# Fields that do not change what is computed (only where and how visibly).
RESUME_MAY_CHANGE = frozenset({"progress", "device", "amp", "checkpoint_every", "out", "store"})


class TrainError(ValueError):
    """Training cannot start or resume; the message says why."""


class AlignConfig(Settings):
    """Stage 1: the auxiliary alignment autoencoder (Linear d_m -> d_proj per modality, back).

    Loss: symmetric InfoNCE between paired vision and text projections + MSE reconstruction of
    both. ``normalize=True`` takes the InfoNCE on cosine similarities (CLIP); the released code
    uses raw dot products (``normalize=False``), which on our synthetic benchmark aligned planted
    concepts to a cosine of ~0.7 against ~0.99 normalised.
    """

    d_proj: int | None = Field(default=None, gt=0)  # default: the text width
    epochs: int = Field(default=50, ge=1)
    batch_size: int = Field(default=2048, ge=2)  # pairs (InfoNCE negatives come from the batch)
    lr: float = Field(default=5e-5, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup: float = Field(default=0.0, ge=0, lt=1)  # fraction of the steps
    temperature: float = Field(default=0.07, gt=0)
    normalize: bool = True
    patience: int = Field(default=10, ge=1)


class TrainConfig(Settings):
    """Stage 2 (the SAE) and the run; ``align`` switches stage 1 on."""

    store: Path
    out: Path
    architecture: Architecture = "vl-sae"
    n_concepts: int | None = Field(default=None, gt=0)  # default: expansion * d_in
    expansion: int = Field(default=8, gt=0)  # the paper's hidden_ratio
    k: int = Field(default=128, ge=1)  # the paper's training --topk
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=512, ge=1)  # rows per modality per step
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup: float = Field(default=0.2, ge=0, lt=1)  # linear warm-up share (paper: 2 of 10 epochs)
    val_fraction: float = Field(default=0.2, gt=0, lt=1)  # held-out pairs (paper: 80/20)
    patience: int = Field(default=10, ge=1)  # epochs without a better validation loss
    # Auxiliary-k loss against dead concepts (Gao et al. 2024): None = 2k (capped at n/2), 0 = off.
    aux_k: int | None = Field(default=None, ge=0)
    aux_k_coef: float = Field(default=1 / 32, ge=0)
    dead_after: int = Field(default=1_000_000, ge=1)  # rows without firing before "dead"
    # Shared concepts: fire on at least this share of the training rows of *each* modality.
    shared_threshold: float = Field(default=1e-3, gt=0, le=1)
    init: Literal["data", "random"] = "data"  # encoder rows from data rows, or Kaiming
    align: AlignConfig | None = None
    window: int = Field(default=4, ge=1)  # shards shuffled together
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # autocast on CUDA; "auto": bf16
    checkpoint_every: int | None = Field(default=None, ge=1)  # steps, besides every epoch
    progress: bool = True

    @model_validator(mode="after")
    def _sizes(self) -> TrainConfig:
        if self.n_concepts is not None and self.k > self.n_concepts:
            raise ValueError(f"k ({self.k}) must be <= n_concepts ({self.n_concepts})")
        return self

    def concepts(self, d_in: int) -> int:
        return self.n_concepts if self.n_concepts is not None else self.expansion * d_in

    def k_aux(self, n_concepts: int) -> int:
        if self.aux_k is not None:
            return min(self.aux_k, n_concepts)
        return min(2 * self.k, n_concepts // 2)

    def check_fits(self, site: str, dims: dict[str, int], world: int) -> None:
        """Refuse settings that cannot train on a store of this site and these widths."""
        if site == "projector" and self.align is not None:
            raise TrainError(
                "stage 1 (align) projects each modality into a new space, but at the projector "
                "site both already share the language model's input space and the guard's "
                "projector mode reads raw projector outputs: drop the align settings"
            )
        if self.align is None and dims["vision"] != dims["text"]:
            raise TrainError(
                f"vision rows are {dims['vision']}-d and text rows {dims['text']}-d: one SAE "
                "needs one width, so enable stage 1 (align) to project both to d_proj"
            )
        batches = {"batch_size": self.batch_size}
        if self.align is not None:
            batches["align.batch_size"] = self.align.batch_size
        for what, batch in batches.items():
            if batch % world:
                raise TrainError(f"{what} ({batch}) must be a multiple of {world} ranks")

    def sae_config(self, d_in: int, source: Source, aux: AuxConfig | None) -> SAEConfig:
        """The stage-2 SAE these settings make for ``d_in``-wide rows."""
        n = self.concepts(d_in)
        if self.k > n:
            raise TrainError(f"k ({self.k}) must be <= the number of concepts ({n})")
        return SAEConfig(
            architecture=self.architecture,
            d_in=d_in,
            n_concepts=n,
            k=self.k,
            source=source,
            aux=aux,
        )
