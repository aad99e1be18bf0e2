"""What the VL-SAE sees in one image or one text: top concepts, labels, what the guard keeps.

The image goes through the model up to the SAE's site exactly as in collection
(:class:`vlsae_guard.pipeline.collect.SiteReader`; at ``vision_tower:L``, every output token of
the vision encoder's layer L, CLS first); its tokens are encoded by the SAE and pooled
(:mod:`.pooled`). For a projector-site SAE with a text side, the concepts of the image's TopK
codes are split by the guard's own
:class:`~vlsae_guard.core.intervention.ProjectorIntervention` (its resolved shared set S, and
with ``text_grounded`` the concepts of the prompt's text): *kept* concepts are decoded back
into the image tokens, *removed* ones are dropped (method replace) or subtracted (method edit).
An A/B answer pair differs by exactly the removed concepts' contribution. A Matryoshka SAE's
concepts also show their group level.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..backends import Inputs
from ..core.intervention import GuardConfig, ProjectorIntervention
from ..core.sae import Codes, SparseAutoencoder
from ..core.sae_config import Modality
from ..pipeline.collect import SiteReader
from .pooled import (
    ConceptsError,
    Pooling,
    check_pooling,
    encode,
    group_levels,
    input_width,
    pool_codes,
    text_skipped,
)


@dataclass
class Hit:
    concept: int
    activation: float  # pooled over the tokens
    tokens: int  # tokens on which the concept is in the TopK code
    label: str | None = None
    kept: bool | None = None  # by the guard (projector mode, images only)
    group: int | None = None  # Matryoshka group level (0: most general); None otherwise


@dataclass
class Inspection:
    modality: Modality
    tokens: int
    active: int  # distinct concepts in any token's TopK code
    pooling: Pooling
    top: list[Hit]
    kept: list[Hit] = field(default_factory=list)  # all active concepts the guard keeps
    removed: list[Hit] = field(default_factory=list)
    kept_share: float | None = None  # share of the pooled activation mass kept

    def to_json(self) -> dict[str, Any]:
        """As a dict; ``group`` only where the SAE has group levels (Matryoshka)."""
        out = asdict(self)
        for hits in (out["top"], out["kept"], out["removed"]):
            for hit in hits:
                if hit["group"] is None:
                    del hit["group"]
        return out


def read_tokens(
    model: nn.Module,
    inputs: Inputs,
    sae: SparseAutoencoder,
    image: Any = None,
    text: str | None = None,
) -> dict[str, Tensor]:
    """The rows the SAE reads for this image and/or text: {"vision": (T, d), "text": (L, d)};
    no "text" for an SAE without a text side (:func:`~.pooled.text_skipped`)."""
    if image is None and text is None:
        raise ConceptsError("give an image, a text or both")
    skipped = text_skipped(sae)
    if image is None and skipped:
        raise ConceptsError(f"{skipped}: give an image")
    source = sae.config.source
    layer = source.layer if source.site == "layer" else None
    vision_layer = source.layer if source.site == "vision_tower" else None
    try:
        reader = SiteReader(model, inputs, layer, vision_layer=vision_layer)
    except ValueError as e:  # a layer this model does not have
        raise ConceptsError(f"{e}: the SAE was trained for another model") from e
    dims = reader.dims()
    for modality in ("vision",) if skipped else ("vision", "text"):
        if dims[modality] != input_width(sae, modality):
            raise ConceptsError(
                f"the model's {modality} rows at the SAE's site have width {dims[modality]}, but "
                f"the SAE reads {input_width(sae, modality)}: it was trained for another model"
            )
    if image is None:
        if layer is not None:
            raise ConceptsError(
                f"this SAE reads layer {layer}, where a text is read after an image in the "
                "prompt: give an image too"
            )
        ids = torch.tensor(inputs.caption_ids([text]), dtype=torch.long)
        with torch.inference_mode():
            return {"text": reader.backend.embed(ids.to(reader.device))[0].float().cpu()}
    vision, words = reader([image], [text or ""], [0])[0]
    out = {"vision": vision.float()}
    if text is not None and not skipped:
        out["text"] = words.float()
    return out


def guard_keep(
    sae: SparseAutoencoder, codes: Codes, config: GuardConfig, text_rows: Tensor | None = None
) -> Tensor:
    """Per token and TopK slot: does the guard keep that concept (bool, like ``codes``)?

    Uses the intervention's resolved shared set and, with ``text_grounded``, its own
    ``text_concepts`` mask of the prompt's text."""
    intervention = ProjectorIntervention.build(sae, config)
    masks = None
    if config.text_grounded:
        if text_rows is None:
            raise ConceptsError("text-grounded guarding needs the prompt's text (--text)")
        masks = intervention.text_concepts([text_rows.to(sae.device)])
    codes = Codes(codes.values.to(sae.device), codes.indices.to(sae.device), codes.n_concepts)
    owners = torch.zeros(len(codes.indices), dtype=torch.long)
    return intervention.keep(codes, owners, masks).cpu()


def inspect_rows(
    sae: SparseAutoencoder,
    rows: Tensor,
    modality: Modality,
    *,
    pooling: Pooling = "mean",
    top: int = 10,
    labels: dict[int, str] | None = None,
    guard: GuardConfig | None = None,
    text_rows: Tensor | None = None,
) -> Inspection:
    """Top concepts of ``rows`` (one image's or one text's tokens), pooled; with ``guard``,
    the guard's kept/removed split of every active concept. ``cls`` reads the first row (the
    CLS token of an SAE at the vision tower)."""
    if len(rows) == 0:
        raise ConceptsError(f"no {modality} tokens to inspect")
    check_pooling(sae, pooling)
    if pooling == "cls":
        rows = rows[:1]
    labels = labels or {}
    groups = group_levels(sae)
    codes = encode(sae, rows, modality)
    owners = torch.zeros(len(rows), dtype=torch.long)
    pooled = pool_codes(codes, owners, 1, pooling).coalesce()
    concepts = pooled.indices()[1]
    values = pooled.values()
    active = codes.values > 0  # spare slots of a threshold code hold 0
    tokens = torch.bincount(codes.indices[active], minlength=sae.n_concepts)
    kept_of: dict[int, bool] = {}
    if guard is not None:
        keep = guard_keep(sae, codes, guard, text_rows)
        per = torch.zeros(sae.n_concepts, dtype=torch.long)
        per.index_add_(0, codes.indices[active], keep[active].long())
        kept_of = {c: bool(per[c] > 0) for c in concepts.tolist()}
    order = torch.argsort(values, descending=True, stable=True)
    hits = [
        Hit(
            c,
            float(values[i]),
            int(tokens[c]),
            labels.get(c),
            kept_of.get(c),
            None if groups is None else int(groups[c]),
        )
        for i in order.tolist()
        for c in [int(concepts[i])]
    ]
    result = Inspection(modality, len(rows), len(hits), pooling, hits[:top])
    if guard is not None:
        result.kept = [h for h in hits if h.kept]
        result.removed = [h for h in hits if not h.kept]
        total = sum(h.activation for h in hits)
        result.kept_share = sum(h.activation for h in result.kept) / total if total else None
    return result


def format_inspection(name: str, result: Inspection, top: int = 10) -> str:
    """Aligned text lines: the top concepts (with their group levels when the SAE has them),
    then the guard's split when known."""
    grouped = any(h.group is not None for h in result.top + result.kept + result.removed)

    def table(hits: list[Hit]) -> list[str]:
        group = f"  {'group':>5}" if grouped else ""
        lines = [f"  {'concept':>8}  {'activation':>10}  {'tokens':>6}{group}  {'guard':<7}  label"]
        for h in hits:
            guard = {None: "", True: "kept", False: "removed"}[h.kept]
            group = f"  {h.group:>5}" if grouped else ""
            lines.append(
                f"  {'#' + str(h.concept):>8}  {h.activation:>10.4f}  {h.tokens:>6}{group}  "
                f"{guard:<7}  {h.label or ''}"
            )
        return lines

    lines = [
        f"{name}: {result.tokens} {result.modality} tokens, {result.active} concepts active, "
        f"{result.pooling} pooling; top {len(result.top)}:"
    ]
    lines += table(result.top)
    if result.kept_share is not None or result.kept or result.removed:
        share = "" if result.kept_share is None else f" ({result.kept_share:.1%} of the activation)"
        lines.append(
            f"guard: keeps {len(result.kept)} of the {result.active} active concepts{share}, "
            f"removes {len(result.removed)}"
        )
        if result.removed:
            lines.append(f"removed, strongest {min(top, len(result.removed))}:")
            lines += table(result.removed[:top])
        if result.kept:
            lines.append(f"kept, strongest {min(top, len(result.kept))}:")
            lines += table(result.kept[:top])
    return "\n".join(lines)
