"""Fused decoding for two-arm methods: the arms (:mod:`.arms`) and the loop (:mod:`.engine`).

The fusions themselves are pure functions ``fuse(logits_a, logits_b, step) -> scores`` that
live with their methods (paper mode: :meth:`vlsae_guard.core.paper.FusionProcessor.fuse`).
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
