"""Object evidence in concept space: which VL-SAE concepts answer "is object o in the image?"

The concept-evidence gate (:mod:`vlsae_guard.methods.gate`) needs, for each object a user may
ask about, a score read off the image tokens' concept activations that is high where the object
is and low where only what usually comes *with* it is. Two routes name the object's concepts:

* the VL-SAE design's own: the concepts the object's *word* activates on the text side. On a
  model whose image and text tokens share concepts this needs no images at all; where they share
  none (the CPU lab, AUC 0.50, docs/testbed.md) it carries nothing;
* from captioned images (:func:`fit_object_concepts`, used here): each concept's image-level
  activation (max over the image's tokens) regressed by least squares on the indicators of the
  objects its caption names, all objects at once. The coefficient of object o is the concept's
  response to o *holding the other objects fixed*, so a concept that fires on the ball is not
  credited to the kite that nearly always comes with it in the training captions (the
  co-occurrence a plain "named vs not named" mean difference absorbs). The object's concepts
  are the ``top`` with the largest positive t-statistics; its evidence is their coefficient-
  weighted activation.

The regression direction (concepts on objects, not objects on concepts) is the point: a
classifier of o from concepts would learn the cue, since the cue predicts o in biased captions.
Related: ProjectAway (Jiang et al., 2024, "Interpreting and editing vision-language
representations to mitigate hallucinations") reads object confidence from image tokens through
the logit lens; here the reader is the SAE's concept basis instead of the unembedding.

The same captions give the language prior's statistics: ``conditional[c][o]`` = P(o named | c
named) and ``prevalence[o]``. An object c is a *cue* of o (:meth:`ObjectConcepts.cues`) where
captions name o with most images that hold c and far more often than o's base rate: what a
language model trained on those captions learns to say "o" from.

Each object also keeps the quantiles of its evidence on held-out captioned images that hold it
(``positive_quantiles``, 0..100 %), so a gate sets its threshold as a *recall floor* ("pass all
but q % of images that hold the object"), a number that means the same on every SAE and model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

from .. import outputs
from ..validation import FrozenRecord, describe_validation_error
from .sae import Codes

QUANTILES = 101  # positive_quantiles[i] = the i-th percentile of evidence on positive images


class ObjectEntry(FrozenRecord):
    """One object's concepts, their weights, and its evidence distribution on positives."""

    concepts: list[int] = Field(min_length=1)
    weights: list[float] = Field(min_length=1)
    positive_quantiles: list[float] = Field(min_length=QUANTILES, max_length=QUANTILES)
    n_positive: int = Field(ge=1)  # held-out images behind the quantiles

    @model_validator(mode="after")
    def _check(self) -> ObjectEntry:
        if len(self.concepts) != len(self.weights):
            raise ValueError(f"{len(self.concepts)} concepts but {len(self.weights)} weights")
        if any(c < 0 for c in self.concepts) or len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"concepts must be distinct indices >= 0, got {self.concepts[:8]}")
        q = self.positive_quantiles
        if any(b < a for a, b in zip(q, q[1:], strict=False)):
            raise ValueError("positive_quantiles must be non-decreasing")
        return self

    def threshold(self, recall_floor: float) -> float:
        """The evidence that all but ``1 - recall_floor`` of held-out positives reach."""
        i = (1.0 - recall_floor) * (QUANTILES - 1)
        lo = int(i)
        hi = min(lo + 1, QUANTILES - 1)
        q = self.positive_quantiles
        return q[lo] + (q[hi] - q[lo]) * (i - lo)


class ObjectConcepts(FrozenRecord):
    """Per object name, its concept evidence (saved as ``objects.json``)."""

    format: int = 1
    site: str = "projector"
    n_concepts: int = Field(ge=1)
    objects: dict[str, ObjectEntry] = Field(min_length=1)
    prevalence: dict[str, float] = Field(default_factory=dict)  # P(o named)
    conditional: dict[str, dict[str, float]] = Field(default_factory=dict)  # [c][o]: P(o | c)
    fitted_on: dict = Field(default_factory=dict)  # provenance: images, split, top

    def cues(self, name: str, min_conditional: float, min_lift: float) -> list[str]:
        """The objects of the map whose presence predicts ``name`` in the captions:
        P(name | c) >= ``min_conditional`` and P(name | c) / P(name) >= ``min_lift``."""
        base = self.prevalence.get(name, 0.0)
        out = []
        for c, row in self.conditional.items():
            p = row.get(name, 0.0)
            if c != name and c in self.objects and p >= min_conditional and p >= min_lift * base:
                out.append(c)
        return out

    @model_validator(mode="after")
    def _check(self) -> ObjectConcepts:
        for name, entry in self.objects.items():
            if not name.strip():
                raise ValueError("object names must be non-empty")
            if max(entry.concepts) >= self.n_concepts:
                raise ValueError(
                    f"object {name!r}: concept {max(entry.concepts)} >= n_concepts "
                    f"{self.n_concepts}"
                )
        return self

    def weight_matrix(self, dtype: torch.dtype, device=None) -> Tensor:
        """Objects (in map order) x concepts: each object's weights at its concepts, 0
        elsewhere, so an object's evidence is ``pooled @ weight_matrix[i]``."""
        out = torch.zeros(len(self.objects), self.n_concepts, dtype=dtype, device=device)
        for i, entry in enumerate(self.objects.values()):
            out[i, entry.concepts] = torch.tensor(entry.weights, dtype=dtype, device=device)
        return out

    def evidence(self, pooled: Tensor) -> dict[str, Tensor]:
        """Each object's evidence for each row of ``pooled`` (images x concepts)."""
        if pooled.shape[-1] != self.n_concepts:
            raise ValueError(
                f"codes have {pooled.shape[-1]} concepts, the object map {self.n_concepts}"
            )
        scores = pooled @ self.weight_matrix(pooled.dtype, pooled.device).T
        return {name: scores[..., i] for i, name in enumerate(self.objects)}

    def save(self, path: str | os.PathLike) -> Path:
        return outputs.write_text(path, self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ObjectConcepts:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ValueError(f"{path}: cannot read the object map ({e.strerror})") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(f"{path}: not an object map:\n{describe_validation_error(e)}") from e


def pool(codes: Tensor) -> Tensor:
    """An image's concept activations from dense codes: the max over its tokens, at least 0
    ((..., tokens, F) -> (..., F)); see :func:`pooled_codes` for TopK codes."""
    return codes.amax(-2).clamp_min(0)


def pooled_codes(codes: Codes, owners: Tensor, n_samples: int) -> Tensor:
    """:func:`pool` from TopK codes: per sample, each concept's max activation over the
    sample's token rows (``owners``: each row's sample), zero where no token has it active."""
    k, n = codes.indices.shape[-1], codes.n_concepts
    flat = (owners.reshape(-1, 1) * n + codes.indices.reshape(-1, k)).reshape(-1)
    out = codes.values.new_zeros(n_samples * n)
    out.scatter_reduce_(0, flat, codes.values.reshape(-1), "amax", include_self=True)
    return out.reshape(n_samples, n)


def fit_object_concepts(
    pooled: Tensor,
    labels: Tensor,
    names: list[str],
    top: int = 8,
    calibrate: float = 1 / 3,
    fitted_on: dict | None = None,
) -> ObjectConcepts:
    """Fit each object's concepts from captioned images (see the module).

    ``pooled``: images x concepts (:func:`pool` of the image tokens' codes); ``labels``: images x
    objects, True where the caption names the object. The last ``calibrate`` share of the images
    is held out: the regression sees the rest, the recall-floor quantiles come from the held-out
    images that hold the object. Objects with no concept of positive response are left out.
    """
    if pooled.dim() != 2 or labels.shape != (pooled.shape[0], len(names)):
        raise ValueError(
            f"expected pooled (images x concepts) and labels (images x {len(names)}), found "
            f"{tuple(pooled.shape)} and {tuple(labels.shape)}"
        )
    if not 0 < calibrate < 1 or top < 1:
        raise ValueError(f"need 0 < calibrate < 1 and top >= 1, got {calibrate}, {top}")
    n = pooled.shape[0]
    n_fit = n - max(1, round(n * calibrate))
    x = pooled.double()
    y = labels.double()
    design = torch.cat([torch.ones(n, 1, dtype=x.dtype), y], 1)
    fit_x, fit_d = x[:n_fit], design[:n_fit]
    solution = torch.linalg.lstsq(fit_d, fit_x, driver="gelsd")
    coef = solution.solution  # (1 + objects) x concepts
    residual = fit_x - fit_d @ coef
    dof = max(n_fit - fit_d.shape[1], 1)
    sigma2 = (residual**2).sum(0) / dof  # per concept
    cov = torch.linalg.pinv(fit_d.T @ fit_d).diagonal()  # per coefficient
    objects = {}
    for i, name in enumerate(names):
        t = coef[i + 1] / (sigma2 * cov[i + 1]).clamp_min(1e-12).sqrt()
        t = torch.where(coef[i + 1] > 0, t, torch.zeros_like(t))
        chosen = t.topk(min(top, t.numel())).indices
        chosen = chosen[t[chosen] > 0]
        held = labels[n_fit:, i]
        if not len(chosen) or not held.any():
            continue
        weights = coef[i + 1, chosen]
        scores = x[n_fit:][held][:, chosen] @ weights
        q = torch.quantile(scores, torch.linspace(0, 1, QUANTILES, dtype=x.dtype))
        objects[name] = ObjectEntry(
            concepts=chosen.tolist(),
            weights=weights.tolist(),
            positive_quantiles=q.tolist(),
            n_positive=int(held.sum()),
        )
    if not objects:
        raise ValueError("no object has a concept that responds to it on these images")
    counts = y.sum(0)
    joint = y.T @ y  # [c, o]: images naming both
    conditional = {
        c: {o: float(joint[i, j] / counts[i]) for j, o in enumerate(names)}
        for i, c in enumerate(names)
        if counts[i] > 0
    }
    return ObjectConcepts(
        n_concepts=pooled.shape[1],
        objects=objects,
        prevalence={o: float(counts[j] / n) for j, o in enumerate(names)},
        conditional=conditional,
        fitted_on=dict(fitted_on or {}, images=n, top=top),
    )
