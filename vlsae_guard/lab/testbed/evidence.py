"""Is there concept-level evidence for the object in the image tokens? (issue 17's precondition)

Concept-level methods against a planted hallucination (an arm with the asked object's concepts
removed from the image tokens, or a gate on the object's concept activation) need, for the
object asked about, VL-SAE concepts whose activation on the image tokens says whether the object
is there. Two ways to name those concepts:

- ``shared``: the concepts the object's *word* activates on the text side (its token embedding
  through the SAE's encoder), the route the VL-SAE design offers: one concept space for both
  modalities;
- ``paired``: the ``top`` vision concepts whose max activation over an image's tokens differs
  most between the SAE's training images whose caption names the object and the others, read off
  the image-caption pairs the SAE was trained on (so biased as the captions are);
- ``regressed``: the object map of cue masking
  (:func:`~vlsae_guard.core.object_evidence.fit_object_concepts`: concepts regressed on all
  objects at once, so the cue's concepts are not credited to B), fitted on the same pairs; with
  its recall-floor threshold (``floor``) it says what a *gate* on B's evidence would do: the
  share of cue-only images it would let a "yes" through (``regressed_pass_cue``) and of images
  with B (``regressed_pass_b``).

For each, the evidence of an image is the largest summed activation of those concepts over its
tokens; the AUC compares validation images that hold B with images that hold the cue without B
(1: the evidence separates them; 0.5: it carries nothing; below 0.5: the concepts follow the cue).
"""

from __future__ import annotations

import numpy as np
import torch

from ...backends import detect, load
from ...core.checkpoint import load as load_sae
from ...core.object_evidence import fit_object_concepts, pool
from ...pipeline.collect import SiteReader
from .diagnostic import cues
from .world import Scene, World


def auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counted half; None without both."""
    if not positive or not negative:
        return None
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None]
    return float((p > n).mean() + 0.5 * (p == n).mean())


@torch.inference_mode()
def concept_codes(reader: SiteReader, sae, scenes: list[Scene], batch_size: int = 64) -> list:
    """Each scene's vision codes at the projector (image tokens x concepts)."""
    out = []
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start : start + batch_size]
        rows = reader([s.image for s in batch], [""] * len(batch), list(range(len(batch))))
        out += [sae.encode(vision.float(), "vision") for vision, _ in rows]
    return out


@torch.inference_mode()
def word_concepts(model, tokenizer, sae, word: str) -> torch.Tensor:
    """The concepts the word's token embeddings activate on the text side (a boolean mask)."""
    ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    embedded = detect(model).embed(torch.tensor(ids)).float()
    return sae.encode(embedded, "text").sum(0) > 0


def paired_concepts(codes: list, scenes: list[Scene], word: str, top: int) -> torch.Tensor:
    """The ``top`` concepts whose image-level activation most separates the training images
    whose caption names ``word`` from the others (a boolean mask)."""
    pooled = torch.stack([c.max(0).values for c in codes])
    named = torch.tensor([word in s.present for s in scenes])  # captions name exactly these
    if named.all() or not named.any():
        return torch.zeros(pooled.shape[1], dtype=torch.bool)
    gap = pooled[named].mean(0) - pooled[~named].mean(0)
    mask = torch.zeros_like(gap, dtype=torch.bool)
    mask[gap.topk(min(top, len(gap))).indices] = True
    return mask


def evidence(
    model_dir, sae_dir, world: World, pairs: int = 600, top: int = 4, floor: float = 0.9
) -> list[dict]:
    """One row per planted cause: the two routes' concept counts and AUCs (see the module);
    ``pairs``: the SAE's training images (the first of the training split, as collected)."""
    model, inputs = load(str(model_dir))
    reader = SiteReader(model, inputs, layer=None)
    sae = load_sae(str(sae_dir)).eval()
    train = world.splits["train"][:pairs]
    val = world.splits["val"]
    train_codes, val_codes = concept_codes(reader, sae, train), concept_codes(reader, sae, val)
    tokenizer = inputs.processor.tokenizer
    names = list(world.config.names)
    labels = torch.tensor([[n in sc.present for n in names] for sc in train])
    pooled = torch.stack([pool(c) for c in train_codes])
    regressed = fit_object_concepts(pooled, labels, names, top=max(top, 8))
    val_evidence = regressed.evidence(torch.stack([pool(c) for c in val_codes]))
    rows = []
    for cause in cues(world):
        cue, b = cause["cue"], cause["object"]
        has_cue = [s.stripes if cue == "stripes" else cue in s.present for s in val]
        holds_b = [b in s.present for s in val]
        row = {**cause, "n_b": sum(holds_b)}
        row["n_cue_only"] = sum(c and not h for c, h in zip(has_cue, holds_b, strict=True))
        masks = {
            "shared": word_concepts(model, tokenizer, sae, b),
            "paired": paired_concepts(train_codes, train, b, top),
        }
        for route, mask in masks.items():
            score = [float(c[:, mask].sum(1).max()) if mask.any() else 0.0 for c in val_codes]
            row[f"{route}_concepts"] = int(mask.sum())
            row[f"{route}_fires"] = float(np.mean([s > 0 for s in score]))
            row[f"{route}_auc"] = _separation(score, has_cue, holds_b)
        entry = regressed.objects.get(b)
        score = val_evidence[b].tolist() if entry else [0.0] * len(val)
        row["regressed_concepts"] = len(entry.concepts) if entry else 0
        row["regressed_auc"] = _separation(score, has_cue, holds_b)
        threshold = entry.threshold(floor) if entry else float("inf")
        passed = [x >= threshold for x in score]
        cue_only = [c and not h for c, h in zip(has_cue, holds_b, strict=True)]
        row["regressed_pass_cue"] = _share(passed, cue_only)
        row["regressed_pass_b"] = _share(passed, holds_b)
        rows.append(row)
    return rows


def _separation(score: list[float], has_cue: list[bool], holds_b: list[bool]) -> float | None:
    """AUC of the evidence between images with B and images with the cue without B."""
    return auc(
        [s for s, h in zip(score, holds_b, strict=True) if h],
        [s for s, c, h in zip(score, has_cue, holds_b, strict=True) if c and not h],
    )


def _share(flags: list[bool], where: list[bool]) -> float | None:
    chosen = [f for f, w in zip(flags, where, strict=True) if w]
    return float(np.mean(chosen)) if chosen else None
