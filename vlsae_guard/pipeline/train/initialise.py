"""How the models start: seeded construction, then (stage 2) biases and directions from data."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.sae import SparseAutoencoder
from .streams import Streams, generator


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` with the global RNG seeded (for reproducible initialisation), then restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


@torch.no_grad()
def initialise(sae: SparseAutoencoder, streams: Streams, init: str, seed: int) -> None:
    """Decoder biases = data means; with ``init="data"``, concept directions = data rows (an
    equal share from each modality the SAE reads).

    Drawn from the first windows of epoch 0 (the same on every rank).
    """
    rows: dict[str, list[Tensor]] = {m: [] for m in sae.modalities}
    have = 0
    for positions in streams.windows("train", 0):
        data = streams.load(positions, "train")
        for m in rows:
            rows[m].append(data[m])
            have += len(data[m])
        if have >= 2 * sae.n_concepts:
            break
    data = {m: torch.cat(r) for m, r in rows.items()}
    for m in sae.modalities:
        sae.decoder_for(m).bias.copy_(data[m].mean(0))
    if init != "data":
        return
    gen = generator(seed, 4)
    others = len(rows) - 1
    share = sae.n_concepts // len(rows)
    counts = [share] * others + [sae.n_concepts - share * others]
    picks = []
    for m, count in zip(sae.modalities, counts, strict=True):
        x = data[m] - data[m].mean(0)
        idx = torch.randperm(len(x), generator=gen)[:count]
        picks.append(x[idx.to(x.device)])
    directions = torch.cat(picks)
    if len(directions) < sae.n_concepts:  # fewer rows than concepts: the rest random
        extra = torch.randn(sae.n_concepts - len(directions), sae.config.d_in, generator=gen)
        directions = torch.cat([directions, extra.to(directions)])
    unit = F.normalize(directions, dim=-1)
    for name, param in sae.named_parameters():
        if name in (
            "encoder",
            "encoder.weight",
            "vision_encoder.weight",
            "text_encoder.weight",
        ):
            param.copy_(unit if name == "encoder" else unit * (param.shape[1] ** -0.5))
    for m in sae.modalities:
        sae.decoder_for(m).weight.copy_(0.1 * unit)
