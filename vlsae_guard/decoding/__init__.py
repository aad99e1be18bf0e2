"""Fused decoding for two-arm methods: the arms (:mod:`.arms`), the loop (:mod:`.engine`), the
peers' fusions (:mod:`.fusions`) and their counterfactual inputs (:mod:`.counterfactuals`).

A fusion is a pure function ``fuse(logits_a, logits_b, step) -> scores``; paper mode's lives
with its method (:meth:`vlsae_guard.core.paper.FusionProcessor.fuse`).
"""

from .arms import Arms, SeparateArms, SharedBatch, Stream, doubled
from .engine import (
    ArmsFactory,
    DecodingOptions,
    Fusion,
    StepCallback,
    decode,
    fused_generate,
    generate_inputs,
    generators,
    split_generate_kwargs,
)

__all__ = [
    "Arms",
    "ArmsFactory",
    "DecodingOptions",
    "Fusion",
    "SeparateArms",
    "SharedBatch",
    "StepCallback",
    "Stream",
    "decode",
    "fused_generate",
    "generate_inputs",
    "doubled",
    "generators",
    "split_generate_kwargs",
]
