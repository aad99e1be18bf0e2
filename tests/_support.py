"""Helpers of the collect/train tests: synthetic paired data as a store; one torch thread.

Planted: ``n_atoms`` unit concept atoms in a latent space, shared by both modalities; a
different fixed linear map per modality (``latent -> d_vision`` and ``latent -> d_text``);
per pair, ``active`` atoms with non-negative magnitudes, the *same* code for the image and the
caption; Gaussian noise. A trained VL-SAE should find every atom in both decoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlsae_guard.pipeline.store import Header, StoreWriter


@dataclass
class Planted:
    atoms: Tensor  # (n_atoms, d_latent), unit rows
    maps: dict[str, Tensor]  # modality -> (d_latent, d_modality)
    vision: Tensor  # (n_pairs, d_vision)
    text: Tensor  # (n_pairs, d_text)

    def mapped(self, modality: str) -> Tensor:
        """The atoms as they appear in a modality's input space."""
        return self.atoms @ self.maps[modality]


def make_pairs(
    n_pairs: int = 2048,
    n_atoms: int = 32,
    d_latent: int = 32,
    d_vision: int = 48,
    d_text: int = 40,
    active: int = 3,
    noise: float = 0.01,
    seed: int = 0,
) -> Planted:
    gen = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(n_atoms, d_latent, generator=gen), dim=-1)
    maps = {
        "vision": torch.randn(d_latent, d_vision, generator=gen) / math.sqrt(d_latent),
        "text": torch.randn(d_latent, d_text, generator=gen) / math.sqrt(d_latent),
    }
    codes = torch.zeros(n_pairs, n_atoms)
    for i in range(n_pairs):
        idx = torch.randperm(n_atoms, generator=gen)[:active]
        codes[i, idx] = 0.5 + torch.rand(active, generator=gen)
    latent = codes @ atoms
    vision = latent @ maps["vision"] + noise * torch.randn(n_pairs, d_vision, generator=gen)
    text = latent @ maps["text"] + noise * torch.randn(n_pairs, d_text, generator=gen)
    return Planted(atoms, maps, vision, text)


def write_store(
    directory: Path,
    vision: Tensor,
    text: Tensor,
    pairs_per_shard: int = 256,
    site: str = "layer",
    rows_per_pair: int = 1,
) -> Path:
    """A complete store holding these rows (``rows_per_pair`` vision rows per pair)."""
    n = len(text)
    header = Header(
        model_id="synthetic",
        backend="none",
        site=site,
        layer=0 if site == "layer" else None,
        pooling="mean" if rows_per_pair == 1 else "token",
        dims={"vision": vision.shape[1], "text": text.shape[1]},
        dtype="float32",
        dataset={"format": "synthetic"},
        dataset_fingerprint="synthetic",
        pairs=n,
        pairs_per_shard=pairs_per_shard,
        seed=0,
    )
    writer = StoreWriter.open(directory, header)
    for index in range(header.n_shards):
        start, stop = header.shard_range(index)
        idx = torch.arange(start, stop)
        vrows = vision[start * rows_per_pair : stop * rows_per_pair]
        writer.write(
            index,
            {
                "vision": vrows,
                "text": text[start:stop],
                "vision_pair": idx.repeat_interleave(rows_per_pair),
                "text_pair": idx,
            },
            [
                {"index": i, "id": f"syn:{i}", "image": f"{i}.png", "caption": ""}
                for i in idx.tolist()
            ],
            [],
        )
    writer.finalize()
    return directory


def recovery(decoder: Tensor, mapped_atoms: Tensor) -> tuple[Tensor, Tensor]:
    """(best cosine, best concept) of each planted atom against the decoder rows."""
    cos = F.normalize(mapped_atoms, dim=-1) @ F.normalize(decoder, dim=-1).T
    best = cos.max(-1)
    return best.values, best.indices


@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only adds contention on a 2-core machine (2-10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
