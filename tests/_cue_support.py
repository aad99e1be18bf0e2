"""Cue masking's test object map, shared by the fast tests and the vLLM suite."""

from __future__ import annotations

from vlsae_guard.core.object_evidence import QUANTILES, ObjectConcepts, ObjectEntry


def object_map(sae, present: float) -> ObjectConcepts:
    """Ball's concepts: all of them (any image token holds some); kite's and dog's: one each.
    ``present``: the evidence every quantile records (0: any image holds a ball)."""
    n = sae.n_concepts
    quantiles = [present] * QUANTILES

    def entry(concepts):
        return ObjectEntry(concepts=concepts, weights=[1.0] * len(concepts),
                           positive_quantiles=quantiles, n_positive=10)  # fmt: skip

    return ObjectConcepts(
        n_concepts=n,
        objects={"ball": entry(list(range(n))), "kite": entry([0]), "dog": entry([1])},
        prevalence={"ball": 0.3, "kite": 0.4, "dog": 0.3},
        conditional={"ball": {"kite": 0.97, "dog": 0.3}, "kite": {"ball": 0.6, "dog": 0.3}},
    )
