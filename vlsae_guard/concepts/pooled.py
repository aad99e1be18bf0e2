"""Per-image (and per-caption) concept activations: SAE codes of every token, pooled.

An image's activation for concept ``k`` is the pooled activation over its tokens: ``mean``
(the default: the sum over tokens divided by the number of tokens, zeros included, so a concept
on every token of an image outweighs one on a single token) or ``max``. Pach et al. score CLIP
SAEs on the CLS token, one vector per image; LLaVA's projected tokens have no CLS token, and the
mean is the closest single summary. A store collected with ``--pooling mean`` holds one row per
image already (the mean *input* token): then both poolings return that row's code.

Codes stay sparse: a pooled image has at most ``k x tokens`` non-zero concepts, never a dense
``K``-wide row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core.sae import Codes, SparseAutoencoder
from ..core.sae_config import Modality
from ..pipeline.store import ActivationStore

Pooling = Literal["mean", "max"]
POOLINGS: tuple[Pooling, ...] = ("mean", "max")


class ConceptsError(ValueError):
    """Inputs that do not fit together (SAE, store, embeddings); the message names the file."""


def input_width(sae: SparseAutoencoder, modality: Modality) -> int:
    """Width of the rows the SAE reads for a modality (through its auxiliary AE if any)."""
    aux = sae.config.aux
    if aux is None:
        return sae.config.d_in
    return aux.d_vision if modality == "vision" else aux.d_text


@torch.no_grad()
def encode(
    sae: SparseAutoencoder, rows: Tensor, modality: Modality, batch_rows: int = 8192
) -> Codes:
    """TopK codes of ``rows`` (n x d), through the auxiliary projection when the SAE has one."""
    values, indices = [], []
    for start in range(0, len(rows), batch_rows):
        x = rows[start : start + batch_rows].to(sae.device)
        if sae.aux is not None:
            x = sae.aux.project(x, modality)
        codes = sae.encode_topk(x, modality)
        values.append(codes.values.float().cpu())
        indices.append(codes.indices.cpu())
    if not values:
        empty = torch.empty(0, sae.k)
        return Codes(empty, empty.long(), sae.n_concepts)
    return Codes(torch.cat(values), torch.cat(indices), sae.n_concepts)


def pool_codes(codes: Codes, owners: Tensor, n_owners: int, pooling: Pooling = "mean") -> Tensor:
    """Sparse COO (n_owners x K): each owner's pooled activation over its rows' codes."""
    n = codes.n_concepts
    keys = (owners.long().unsqueeze(1) * n + codes.indices).flatten()
    vals = codes.values.flatten().float()
    keep = vals != 0
    keys, vals = keys[keep], vals[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    rows_of = unique // n
    if pooling == "mean":
        pooled = torch.zeros(len(unique)).index_add_(0, inverse, vals)
        tokens = torch.bincount(owners.long(), minlength=n_owners).clamp_min(1)
        pooled = pooled / tokens[rows_of]
    elif pooling == "max":
        pooled = torch.zeros(len(unique)).scatter_reduce_(
            0, inverse, vals, "amax", include_self=False
        )
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return torch.sparse_coo_tensor(
        torch.stack([rows_of, unique % n]),
        pooled,
        (n_owners, n),
        is_coalesced=True,
        check_invariants=False,
    )


def pool_rows(rows: Tensor, owners: Tensor, n_owners: int, pooling: Pooling = "mean") -> Tensor:
    """Dense (n_owners x d): the rows themselves pooled per owner (raw-neuron baseline)."""
    rows = rows.float()
    index = owners.long().unsqueeze(1).expand_as(rows)
    out = torch.zeros(n_owners, rows.shape[1])
    if pooling == "mean":
        counts = torch.bincount(owners.long(), minlength=n_owners).clamp_min(1)
        return out.scatter_add_(0, index, rows) / counts.unsqueeze(1)
    return out.scatter_reduce_(0, index, rows, "amax", include_self=False)


@dataclass
class PooledBatch:
    """One shard's items: pair indices (sorted), pooled codes and, on request, pooled rows."""

    pairs: Tensor  # (B,) int64
    codes: Tensor  # sparse COO (B x K)
    raw: Tensor | None  # (B x d) or None


def check_store(store: ActivationStore, sae: SparseAutoencoder, modality: Modality) -> None:
    width = store.manifest.dims[modality]
    expected = input_width(sae, modality)
    if width != expected:
        raise ConceptsError(
            f"{store.directory}: {modality} rows have width {width}, but the SAE reads "
            f"{expected}: this store was collected from another model or site than the SAE"
        )


def iter_pooled(
    store: ActivationStore,
    sae: SparseAutoencoder,
    modality: Modality = "vision",
    pooling: Pooling = "mean",
    raw: bool = False,
    batch_rows: int = 8192,
) -> Iterator[PooledBatch]:
    """Shard by shard: every pair's pooled codes of ``modality`` (one shard in memory)."""
    check_store(store, sae, modality)
    for position in range(len(store.shards)):
        tensors = store.load(position, (modality, f"{modality}_pair"))
        rows, pair = tensors[modality], tensors[f"{modality}_pair"]
        pairs, owners = torch.unique(pair, return_inverse=True)
        codes = encode(sae, rows, modality, batch_rows)
        yield PooledBatch(
            pairs,
            pool_codes(codes, owners, len(pairs), pooling),
            pool_rows(rows, owners, len(pairs), pooling) if raw else None,
        )
