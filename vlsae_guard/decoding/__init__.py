"""Fused decoding for two-arm methods: the arms (:mod:`.arms`), the loop (:mod:`.engine`), the
peers' fusions (:mod:`.fusions`) and their counterfactual inputs (:mod:`.counterfactuals`).

A fusion is a pure function ``fuse(logits_a, logits_b, step) -> scores``; paper mode's lives
with its method (:meth:`vlsae_guard.core.paper.FusionProcessor.fuse`).
"""

from .arms import Arms, SeparateArms, SharedBatch, Stream, doubled
from .engine import (
    DecodingOptions,
    Fusion,
    StepCallback,
    decode,
    generators,
    split_generate_kwargs,
)

__all__ = [
    "Arms",
    "DecodingOptions",
    "Fusion",
    "SeparateArms",
    "SharedBatch",
    "StepCallback",
    "Stream",
    "decode",
    "doubled",
    "generators",
    "split_generate_kwargs",
]
