"""Training rows from a store's shards: the train/validation split, windows, batches.

Each epoch visits the shards in a seeded order, ``window`` of them at a time (loaded, filtered to
the split, shuffled together), so memory holds one window, never the store. Batches are planned
from row counts alone, which makes every epoch's batches a pure function of ``(seed, epoch)``: a
resumed run skips what was done without reading it, and ``torchrun`` ranks each take a slice of
the same global batch, so DDP steps stay in lockstep and the gradient equals the single-process
one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ...core.sae_config import MODALITIES, Modality
from ..distributed import Dist
from ..store import ActivationStore
from .config import TrainError

# What one batch element is: a pair (stage 1, pair means) or a row per modality (stage 2).
Unit = Literal["pair", "row"]


def generator(*seeds: int) -> torch.Generator:
    """A generator seeded by a tuple: the run's seed, then what it is for (and epoch, window)."""
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + s) % (2**62)
    return torch.Generator().manual_seed(value)


@dataclass
class _Count:
    vision: int = 0
    text: int = 0
    pairs: int = 0

    def __add__(self, other: _Count) -> _Count:
        return _Count(self.vision + other.vision, self.text + other.text, self.pairs + other.pairs)


def _steps(n: int, batch: int) -> int:
    return max(1, n // batch) if n else 0


class Streams:
    """Train/validation rows of a store, by windows of shards, in a reproducible order.

    The split is by pair (an image's rows never straddle it): a seeded permutation of the pair
    indices puts ``val_fraction`` of them in validation. Once stage 1 is trained, ``project``
    maps rows into its space, and everything loaded afterwards comes projected. Stage 2 batches
    the rows of ``modalities`` (a vision-only SAE: vision rows, the store may have no text).
    """

    def __init__(
        self,
        store: ActivationStore,
        val_fraction: float,
        seed: int,
        window: int,
        dist: Dist,
        device: torch.device,
        modalities: tuple[Modality, ...] = MODALITIES,
    ):
        self.store, self.seed, self.window = store, seed, window
        self.modalities = modalities
        self.dist, self.device = dist, device
        self.project: Callable[[Tensor, str], Tensor] | None = None
        n_pairs = store.manifest.pairs
        order = torch.randperm(n_pairs, generator=generator(seed, 1))
        self.val = torch.zeros(n_pairs, dtype=torch.bool)
        self.val[order[: round(val_fraction * n_pairs)]] = True
        self.counts: dict[str, list[_Count]] = {"train": [], "val": []}
        for position in range(len(store.shards)):
            rows = store.load(position, ("vision_pair", "text_pair"))
            for split, keep in (("train", False), ("val", True)):
                v = self.val[rows["vision_pair"]] == keep
                t = self.val[rows["text_pair"]] == keep
                pairs = rows["vision_pair"][v].unique().numel()
                self.counts[split].append(_Count(int(v.sum()), int(t.sum()), pairs))
        for split in ("train", "val"):
            if not sum(c.pairs for c in self.counts[split]):
                raise TrainError(
                    f"{store.directory}: the {split} split has no pairs "
                    f"({store.manifest.counts.kept} kept pairs, val_fraction={val_fraction})"
                )

    def total(self, split: str) -> _Count:
        return self.window_count(split, range(len(self.counts[split])))

    def windows(self, split: str, epoch: int | None = None) -> list[list[int]]:
        """Shard positions grouped in windows; shuffled per epoch when ``epoch`` is given."""
        positions = [p for p, c in enumerate(self.counts[split]) if c.pairs]
        if epoch is not None:
            perm = torch.randperm(len(positions), generator=generator(self.seed, 2, epoch))
            positions = [positions[i] for i in perm.tolist()]
        return [positions[i : i + self.window] for i in range(0, len(positions), self.window)]

    def window_count(self, split: str, positions: Iterable[int]) -> _Count:
        return sum((self.counts[split][p] for p in positions), _Count())

    def load(self, positions: list[int], split: str) -> dict[str, Tensor]:
        """Rows of these shards in the split, as float32 on the training device."""
        parts: dict[str, list[Tensor]] = {n: [] for n in ("vision", "text", "vp", "tp")}
        for p in positions:
            data = self.store.load(p)
            for name, pair_name, key in (
                ("vision", "vision_pair", "vp"),
                ("text", "text_pair", "tp"),
            ):
                keep = self.val[data[pair_name]] == (split == "val")
                parts[name].append(data[name][keep])
                parts[key].append(data[pair_name][keep])
        out = {k: torch.cat(v) for k, v in parts.items()}
        for name in ("vision", "text"):
            out[name] = out[name].to(self.device, torch.float32)
        if self.project is not None:
            with torch.no_grad():
                for name in ("vision", "text"):
                    out[name] = self.project(out[name], name).float()
        return out

    def mine(self, windows: list[list[int]]) -> Iterator[list[int]]:
        """This rank's share of ``windows`` (evaluation passes: round robin)."""
        for w, positions in enumerate(windows):
            if w % self.dist.world == self.dist.rank:
                yield positions

    # -- batches -----------------------------------------------------------------------------

    def steps(self, positions: list[int], batch: int, unit: Unit) -> int:
        """Steps of one training window: its pairs, or its longer modality's rows, per batch."""
        c = self.window_count("train", positions)
        rows = max(getattr(c, m) for m in self.modalities)
        return _steps(c.pairs if unit == "pair" else rows, batch)

    def epoch_steps(self, epoch: int, batch: int, unit: Unit) -> int:
        return sum(self.steps(p, batch, unit) for p in self.windows("train", epoch))

    def pair_batches(self, epoch: int, batch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Stage 1: global batches of pair means; this rank's slice of each."""
        for w, positions in enumerate(self.windows("train", epoch)):
            steps = self.steps(positions, batch, "pair")
            if skip >= steps:
                skip -= steps
                continue
            _, v, t = pair_means(self.load(positions, "train"))
            perm = torch.randperm(len(v), generator=generator(self.seed, 3, epoch, w))
            for i in range(skip, steps):
                idx = perm[(i * batch + torch.arange(batch)) % len(v)]
                idx = idx[self.dist.rank :: self.dist.world].to(self.device)
                yield v[idx], t[idx]
            skip = 0

    def row_batches(self, epoch: int, batch: int, skip: int) -> Iterator[tuple[Tensor, ...]]:
        """Stage 2: global batches of ``batch`` rows of each of ``modalities``; this rank's slice
        of each.

        Per window, the modality with more rows sets the step count and the other one cycles.
        """
        for w, positions in enumerate(self.windows("train", epoch)):
            steps = self.steps(positions, batch, "row")
            if skip >= steps:
                skip -= steps
                continue
            data = self.load(positions, "train")
            gen = generator(self.seed, 5, epoch, w)
            perms = {m: torch.randperm(len(data[m]), generator=gen) for m in self.modalities}
            for i in range(skip, steps):
                pick = i * batch + torch.arange(batch)
                out = []
                for m in self.modalities:
                    idx = perms[m][pick % len(perms[m])][self.dist.rank :: self.dist.world]
                    out.append(data[m][idx.to(self.device)])
                yield tuple(out)
            skip = 0


def pair_means(data: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(pair ids, mean vision row, mean text row) of every pair in ``data``, aligned."""
    pairs, inverse_v = data["vp"].unique(return_inverse=True)
    inverse_t = torch.searchsorted(pairs, data["tp"])
    out = []
    for x, inverse in ((data["vision"], inverse_v), (data["text"], inverse_t)):
        inverse = inverse.to(x.device)
        sums = x.new_zeros(len(pairs), x.shape[1]).index_add_(0, inverse, x)
        counts = x.new_zeros(len(pairs)).index_add_(0, inverse, x.new_ones(len(x)))
        out.append(sums / counts.clamp_min(1)[:, None])
    return pairs, out[0], out[1]
