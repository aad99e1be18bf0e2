"""Settings of ``vlsae-guard train``; defaults are the VL-SAE paper's where it states them.

The resolved config is written next to the checkpoint (``training.json``), so a checkpoint
always says how it was made. A resumed run must use the same settings except the ones in
:data:`RESUME_MAY_CHANGE`. Settings that cannot train on a store raise :class:`TrainError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ...core.sae import ARCHITECTURES
from ...core.sae_config import Architecture, AuxConfig, Modality, SAEConfig, Source
from ...validation import Settings
from ..store import Manifest

# Fields that do not change what is computed (only where and how visibly).
RESUME_MAY_CHANGE = frozenset({"progress", "device", "amp", "checkpoint_every", "out", "store"})


class TrainError(ValueError):
    """Training cannot start or resume; the message says why."""


# Fields that apply to some architectures only; set for another one, they are refused.
_THRESHOLD = ("threshold_beta", "threshold_start")
_ONLY: dict[str, tuple[str, ...]] = {
    "batchtopk": _THRESHOLD,
    "matryoshka": (*_THRESHOLD, "group_fractions"),
}
# Two-modality fields that a vision-only SAE (no text rows, no shared concepts) refuses.
_TWO_MODALITIES = ("shared_threshold", "align")
_OPTIONAL = (*_THRESHOLD, "group_fractions", *_TWO_MODALITIES)


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
    # BatchTopK / Matryoshka (dictionary_learning's trainers): inference keeps activations
    # above a running mean (weight beta on the old value) of the smallest activation BatchTopK
    # kept, updated after every step from step ``threshold_start`` on.
    threshold_beta: float = Field(default=0.999, gt=0, lt=1)
    threshold_start: int = Field(default=1000, ge=0)
    # Matryoshka: the nested groups' shares of the concepts (Bussmann et al. 2025's release).
    group_fractions: list[Annotated[float, Field(gt=0)]] = Field(
        default=[1 / 16, 1 / 8, 1 / 4, 9 / 16], min_length=1
    )
    window: int = Field(default=4, ge=1)  # shards shuffled together
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # autocast on CUDA; "auto": bf16
    checkpoint_every: int | None = Field(default=None, ge=1)  # steps, besides every epoch
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.n_concepts is not None and self.k > self.n_concepts:
            raise ValueError(f"k ({self.k}) must be <= n_concepts ({self.n_concepts})")
        if abs(sum(self.group_fractions) - 1) > 1e-6:
            raise ValueError(f"group_fractions must sum to 1, got {sum(self.group_fractions)}")
        applies = _ONLY.get(self.architecture, ())
        if len(self.modalities) == 2:
            applies += _TWO_MODALITIES
        fields = type(self).model_fields  # set at their defaults, they are fine (dumps read back)
        wrong = [
            n
            for n in _OPTIONAL
            if n not in applies
            and getattr(self, n) != fields[n].get_default(call_default_factory=True)
        ]
        if wrong:
            why = " (it reads vision rows only)" if len(self.modalities) == 1 else ""
            raise ValueError(f"{wrong} do not apply to architecture {self.architecture!r}{why}")
        return self

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """The modalities the architecture reads, so the rows it trains on."""
        return ARCHITECTURES[self.architecture].modalities

    def concepts(self, d_in: int) -> int:
        return self.n_concepts if self.n_concepts is not None else self.expansion * d_in

    def k_aux(self, n_concepts: int) -> int:
        if self.aux_k is not None:
            return min(self.aux_k, n_concepts)
        return min(2 * self.k, n_concepts // 2)

    def groups(self, n_concepts: int) -> list[int] | None:
        """Matryoshka's group sizes: ``int(f * n)`` for all groups but the last, which takes the
        rest (dictionary_learning's ``MatryoshkaBatchTopKTrainer``)."""
        if self.architecture != "matryoshka":
            return None
        sizes = [int(f * n_concepts) for f in self.group_fractions[:-1]]
        sizes.append(n_concepts - sum(sizes))
        if min(sizes) < 1:
            raise TrainError(
                f"group_fractions {self.group_fractions} make groups of {sizes} concepts out of "
                f"{n_concepts}: every group needs at least one (more concepts or larger shares)"
            )
        return sizes

    def check_fits(self, manifest: Manifest, world: int) -> None:
        """Refuse settings that cannot train on this store (its site, widths and rows)."""
        site, dims = manifest.site, manifest.dims
        self.groups(self.concepts(dims["vision"]))  # Matryoshka (no stage 1: d_in is vision's)
        if len(self.modalities) == 2 and not manifest.counts.text_rows:
            raise TrainError(
                f"architecture {self.architecture!r} learns concepts of vision and text rows, "
                f"but this store (site {site!r}) holds no text rows: train a vision-only "
                "architecture (batchtopk or matryoshka) on it"
            )
        if site == "projector" and self.align is not None:
            raise TrainError(
                "stage 1 (align) projects each modality into a new space, but at the projector "
                "site both already share the language model's input space and the guard's "
                "projector mode reads raw projector outputs: drop the align settings"
            )
        if len(self.modalities) == 2 and self.align is None and dims["vision"] != dims["text"]:
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
            groups=self.groups(n),
        )
