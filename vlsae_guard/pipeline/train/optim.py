"""How a step is taken besides the optimiser: the learning-rate schedule, mixed precision."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch


def warmup_cosine(total: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup * total`` steps, then cosine to zero."""
    warm = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def amp(mode: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context factory, grad scaler) for ``TrainConfig.amp``; mixed precision on CUDA
    only."""
    if device.type != "cuda" or mode == "off":
        return nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16

    def autocast():
        return torch.autocast("cuda", dtype=dtype)

    return autocast, torch.amp.GradScaler("cuda", enabled=mode == "fp16")
