"""Per-image (and per-caption) concept activations: SAE codes of every token, pooled.

An image's activation for concept ``k`` is the pooled activation over its tokens: ``mean``
(the default: the sum over tokens divided by the number of tokens, zeros included, so a concept
on every token of an image outweighs one on a single token), ``max``, or ``cls``: the image's
first token alone, CLIP's CLS token at the vision tower site (``vision_tower:L``, where tokens
are CLS first, then the patches; with several crops per image, LLaVA-NeXT's, the first crop's:
the whole image). Pach et al. score CLIP SAEs on the CLS token, one vector per
image; LLaVA's projected tokens have no CLS token, so there ``cls`` is refused and the mean is
the closest single summary. A store collected with ``--pooling mean`` holds one row per image
already (the mean *input* token): then mean and max return that row's code.

Vision-encoder SAEs (BatchTopK, Matryoshka; or any SAE at the vision tower, which sees no text)
have no text side: :func:`text_skipped` says why, and callers skip captions and the guard's
shared set instead of reading them.

Codes stay sparse: a pooled image has at most ``k x tokens`` non-zero concepts, never a dense
``K``-wide row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..core.sae import Codes, MatryoshkaSAE, SparseAutoencoder
from ..core.sae_config import Modality, Source
from ..pipeline.store import ActivationStore

Pooling = Literal["mean", "max", "cls"]
POOLINGS: tuple[Pooling, ...] = ("mean", "max", "cls")


class ConceptsError(ValueError):
    """Inputs that do not fit together (SAE, store, embeddings); the message names the file."""


def text_skipped(sae: SparseAutoencoder) -> str | None:
    """Why the SAE has no text side (captions, text decoder, shared set) to read; None when it
    has one."""
    if "text" not in sae.modalities:
        return f"the {sae.config.architecture} SAE reads images only"
    if sae.config.source.site == "vision_tower":
        return "the SAE reads CLIP's vision tower, which sees no text"
    return None


def group_levels(sae: SparseAutoencoder) -> Tensor | None:
    """Each concept's Matryoshka group (0: the first, most general); None for other SAEs."""
    return sae.group_of() if isinstance(sae, MatryoshkaSAE) else None


def check_pooling(sae: SparseAutoencoder, pooling: Pooling) -> None:
    """``cls`` needs a CLS token: only the vision tower has one (LLaVA drops it before the
    projector, and a decoder layer sees the projected tokens)."""
    if pooling not in POOLINGS:
        raise ConceptsError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "cls" and sae.config.source.site != "vision_tower":
        where = sae.config.source.place or "an unrecorded site"
        raise ConceptsError(
            f"pooling 'cls' reads the CLS token, which only the vision tower's tokens have; "
            f"this SAE was trained at {where} (use mean or max)"
        )


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


def first_rows(owners: Tensor, n_owners: int) -> Tensor:
    """Index of each owner's first row (its CLS token at the vision tower); every owner needs
    a row."""
    positions = torch.arange(len(owners))
    first = torch.full((n_owners,), len(owners), dtype=torch.long)
    return first.scatter_reduce_(0, owners.long(), positions, "amin")


def pool_codes(codes: Codes, owners: Tensor, n_owners: int, pooling: Pooling = "mean") -> Tensor:
    """Sparse COO (n_owners x K): each owner's pooled activation over its rows' codes."""
    if pooling == "cls":  # each owner's first row alone: its code as it is
        first = first_rows(owners, n_owners)
        codes = Codes(codes.values[first], codes.indices[first], codes.n_concepts)
        owners, pooling = torch.arange(n_owners), "max"
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
    if pooling == "cls":
        return rows[first_rows(owners, n_owners)].float()
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


def check_store(
    store: ActivationStore, sae: SparseAutoencoder, modality: Modality, pooling: Pooling = "mean"
) -> None:
    """The store's rows are what the SAE reads: same width, same site when the SAE records
    one, and for ``cls`` every image's tokens whole (CLS first)."""
    check_pooling(sae, pooling)
    manifest = store.manifest
    width = manifest.dims[modality]
    expected = input_width(sae, modality)
    if width != expected:
        raise ConceptsError(
            f"{store.directory}: {modality} rows have width {width}, but the SAE reads "
            f"{expected}: this store was collected from another model or site than the SAE"
        )
    trained_at = sae.config.source.place
    here = Source(site=manifest.site, layer=manifest.layer, point=manifest.point).place
    if trained_at is not None and here != trained_at:
        raise ConceptsError(
            f"{store.directory}: collected at {here}, but the SAE was trained at {trained_at}"
        )
    if pooling == "cls" and (manifest.pooling != "token" or manifest.tokens_per_image):
        raise ConceptsError(
            f"{store.directory}: pooling 'cls' needs every token of each image (CLS first), but "
            + (
                "this store holds one mean row per image"
                if manifest.pooling == "mean"
                else f"this store kept {manifest.tokens_per_image} random tokens per image"
            )
        )


def iter_pooled(
    store: ActivationStore,
    sae: SparseAutoencoder,
    modality: Modality = "vision",
    pooling: Pooling = "mean",
    raw: bool = False,
    batch_rows: int = 8192,
) -> Iterator[PooledBatch]:
    """Shard by shard: every pair's pooled codes of ``modality`` (one shard in memory). The
    store is checked against the SAE at the call, before anything is read."""
    check_store(store, sae, modality, pooling)
    return _iter_pooled(store, sae, modality, pooling, raw, batch_rows)


def _iter_pooled(
    store: ActivationStore,
    sae: SparseAutoencoder,
    modality: Modality,
    pooling: Pooling,
    raw: bool,
    batch_rows: int,
) -> Iterator[PooledBatch]:
    for position in range(len(store.shards)):
        tensors = store.load(position, (modality, f"{modality}_pair"))
        rows, pair = tensors[modality], tensors[f"{modality}_pair"]
        pairs, owners = torch.unique(pair, return_inverse=True)
        if pooling == "cls":  # encode the CLS rows only
            rows, owners = rows[first_rows(owners, len(pairs))], torch.arange(len(pairs))
        codes = encode(sae, rows, modality, batch_rows)
        yield PooledBatch(
            pairs,
            pool_codes(codes, owners, len(pairs), pooling),
            pool_rows(rows, owners, len(pairs), pooling) if raw else None,
        )
