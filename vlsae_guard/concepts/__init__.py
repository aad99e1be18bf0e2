"""Interpretability of a VL-SAE's concepts: inspect one input, score monosemanticity, catalog.

* :mod:`.monosemanticity`: the monosemanticity score in closed form (pure math).
* :mod:`.pooled`: per-image / per-caption concept activations from a store (SAE codes, pooled).
* :mod:`.inspect`: the top concepts of one image or text and the guard's kept/removed split.
* :mod:`.catalog`: each concept's top images and captions, a label, JSON and static HTML.
* :mod:`.ms`: the score over a store's images against a user-supplied embeddings file.
"""

from .monosemanticity import MSAccumulator, monosemanticity_score, pairwise_monosemanticity
from .pooled import ConceptsError

__all__ = [
    "ConceptsError",
    "MSAccumulator",
    "monosemanticity_score",
    "pairwise_monosemanticity",
]
