"""The monosemanticity score (MS) of Pach et al., "Sparse Autoencoders Learn Monosemantic
Features in Vision-Language Models", in closed form. Pure tensor math: no model, no backend.

For concept ``k`` over ``N`` images, activations ``a`` are min-max normalised to ``ã`` in [0, 1]
and ``s_nm = <e_n, e_m>`` is the cosine similarity of the images' embeddings from a separate
encoder (CLIP, DINOv2, ...)::

    MS_k = sum_{n<m} ã_n ã_m s_nm / sum_{n<m} ã_n ã_m

With unit rows ``e_n`` (``s_nn = 1``) both sums have a closed form, so no pair is visited:

    numerator   = (||E^T ã||^2 - sum_n ã_n^2) / 2
    denominator = ((sum_n ã_n)^2 - sum_n ã_n^2) / 2

Embeddings are **normalised here** (the reference code uses cosine similarity, which does the
same); a zero or non-finite row is an error. A concept whose activations are constant over the
images (max == min), or which is non-zero after normalisation on fewer than two images
(denominator 0), is *dead*: its score is NaN, as in the reference code.

Two entry points share the math: :func:`monosemanticity_score` for activations in memory
(dense, chunked over concepts; or a torch sparse matrix) and :class:`MSAccumulator`, which
streams over images in one pass and keeps only per-concept sums (``K x D`` for ``E^T a``): the
min-max normalisation is affine, so ``ã``'s sums follow from the raw sums and min/max at the end.
TopK codes are sparse (``k`` of ``K`` per row), so the streamed update costs ``nnz x D``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

# A denominator below this share of (sum ã)^2 means one image carries all the weight: dead.
DEAD_TOLERANCE = 1e-9
_SPARSE = (torch.sparse_coo, torch.sparse_csr)


def _tensor(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    return x


def normalize_embeddings(embeddings, dtype: torch.dtype = torch.float64) -> Tensor:
    """Unit-norm rows in ``dtype``; raises ValueError on a zero or non-finite row."""
    e = _tensor(embeddings, "embeddings")
    if e.dim() != 2:
        raise ValueError(f"embeddings: expected a 2-D (N images x D) matrix, got {tuple(e.shape)}")
    e = e.to(dtype)
    norms = torch.linalg.vector_norm(e, dim=1)
    bad = (~torch.isfinite(norms) | (norms == 0)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"embeddings: {len(bad)} row(s) are zero or not finite (first: row {int(bad[0])}); "
            "they have no direction to compare"
        )
    return e / norms.unsqueeze(1)


def _check(activations, embeddings) -> tuple[Tensor, Tensor]:
    a, e = _tensor(activations, "activations"), _tensor(embeddings, "embeddings")
    if a.dim() != 2:
        raise ValueError(
            f"activations: expected a 2-D (N images x K concepts) matrix, got {tuple(a.shape)}"
        )
    if e.dim() != 2 or e.shape[0] != a.shape[0]:
        raise ValueError(
            f"embeddings: expected {a.shape[0]} rows (one per image, like the activations), "
            f"got shape {tuple(e.shape)}"
        )
    if a.shape[0] < 2:
        raise ValueError(f"activations: the score needs at least 2 images, got {a.shape[0]}")
    return a, e


def _score(q: Tensor, s1: Tensor, s2: Tensor, alive: Tensor) -> Tensor:
    """MS from ||E^T ã||^2, sum ã and sum ã^2 (all per concept); NaN where dead."""
    numerator = (q - s2) / 2
    denominator = (s1 * s1 - s2) / 2
    ok = alive & (denominator > DEAD_TOLERANCE * s1 * s1)
    return torch.where(ok, numerator / torch.where(ok, denominator, 1), math.nan)


def monosemanticity_score(
    activations,
    embeddings,
    *,
    chunk_size: int = 4096,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """MS of every concept: ``activations`` (N x K, dense or torch sparse), ``embeddings``
    (N x D, normalised here). Returns K scores in ``dtype`` on the activations' device; NaN
    marks a dead concept. Dense input is processed ``chunk_size`` concepts at a time, so the
    extra memory is ``N x chunk_size``."""
    a, e = _check(activations, embeddings)
    if a.layout in _SPARSE:
        acc = MSAccumulator(a.shape[1], e.shape[1], dtype=dtype, device=a.device)
        acc.add(a, e)
        return acc.scores()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    e = normalize_embeddings(e.to(a.device), dtype)
    out = torch.empty(a.shape[1], dtype=dtype, device=a.device)
    for start in range(0, a.shape[1], chunk_size):
        chunk = a[:, start : start + chunk_size].to(dtype)
        lo, hi = chunk.amin(0), chunk.amax(0)
        span = hi - lo
        alive = span > 0
        norm = (chunk - lo) / torch.where(alive, span, 1)
        v = e.T @ norm  # (D, chunk)
        q = (v * v).sum(0)
        out[start : start + chunk.shape[1]] = _score(q, norm.sum(0), (norm * norm).sum(0), alive)
    return out


def pairwise_monosemanticity(activations, embeddings, dtype: torch.dtype = torch.float64):
    """The definition, visiting every pair ``n < m`` (a loop over ``n``, like the reference
    code): O(N^2 K). For tests and the benchmark only."""
    a, e = _check(activations, embeddings)
    a = a.to_dense() if a.layout in _SPARSE else a
    a = a.to(dtype)
    e = normalize_embeddings(e, dtype)
    lo, hi = a.amin(0), a.amax(0)
    norm = (a - lo) / torch.where(hi > lo, hi - lo, 1)
    weighted = torch.zeros(a.shape[1], dtype=dtype)
    weights = torch.zeros(a.shape[1], dtype=dtype)
    for n in range(a.shape[0] - 1):
        sim = e[n + 1 :] @ e[n]  # (N - n - 1,)
        w = norm[n] * norm[n + 1 :]  # (N - n - 1, K)
        weighted += sim @ w
        weights += w.sum(0)
    return torch.where((weights > 0) & (hi > lo), weighted / weights, math.nan)


class MSAccumulator:
    """Streams images (in any batches, any order) and scores every concept at the end.

    Keeps, per concept, ``sum a``, ``sum a^2``, min, max and ``sum_n a_n e_n`` (K x D), plus
    ``sum_n e_n``. Dense batches update in O(B K D); torch sparse batches (pooled TopK codes)
    in O(nnz D) (a sparse-dense matmul), where a concept missing from an image counts as
    activation 0 there.
    """

    def __init__(
        self,
        n_concepts: int,
        embed_dim: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ):
        def zeros(*shape):
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.n_concepts, self.embed_dim, self.dtype = n_concepts, embed_dim, dtype
        self.device = torch.device(device)
        self.n = 0
        self.s1, self.s2 = zeros(n_concepts), zeros(n_concepts)
        self.ea = zeros(n_concepts, embed_dim)
        self.esum = zeros(embed_dim)
        self.lo = torch.full((n_concepts,), math.inf, dtype=dtype, device=device)
        self.hi = torch.full((n_concepts,), -math.inf, dtype=dtype, device=device)
        self.present = torch.zeros(n_concepts, dtype=torch.long, device=device)

    def add(self, activations, embeddings) -> None:
        """Add a batch: activations (B x K, dense or torch sparse) and embeddings (B x D)."""
        a, e = _tensor(activations, "activations"), _tensor(embeddings, "embeddings")
        if a.dim() != 2 or a.shape[1] != self.n_concepts:
            raise ValueError(f"activations: expected (B x {self.n_concepts}), got {tuple(a.shape)}")
        if e.dim() != 2 or e.shape != (a.shape[0], self.embed_dim):
            raise ValueError(
                f"embeddings: expected ({a.shape[0]} x {self.embed_dim}), got {tuple(e.shape)}"
            )
        if a.shape[0] == 0:
            return
        e = normalize_embeddings(e.to(self.device), self.dtype)
        self.n += a.shape[0]
        self.esum += e.sum(0)
        a = a.to(self.device)
        if a.layout in _SPARSE:
            self._add_sparse(a, e)
            return
        a = a.to(self.dtype)
        self.s1 += a.sum(0)
        self.s2 += (a * a).sum(0)
        self.ea.addmm_(a.T, e)
        self.lo = torch.minimum(self.lo, a.amin(0))
        self.hi = torch.maximum(self.hi, a.amax(0))
        self.present += a.shape[0]

    def _add_sparse(self, a: Tensor, e: Tensor) -> None:
        a = a.to_sparse_coo().coalesce()
        rows, cols = a.indices()
        vals = a.values().to(self.dtype)
        self.s1.index_add_(0, cols, vals)
        self.s2.index_add_(0, cols, vals * vals)
        self.lo.scatter_reduce_(0, cols, vals, "amin")
        self.hi.scatter_reduce_(0, cols, vals, "amax")
        self.present += torch.bincount(cols, minlength=self.n_concepts)
        # E^T a as (a^T in CSR) @ E: a sparse-dense product, far faster on CPU than an
        # index_add_ of nnz gathered embedding rows.
        a_t = torch.sparse_coo_tensor(
            torch.stack([cols, rows]), vals, (self.n_concepts, len(e)), check_invariants=False
        )
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.ea.addmm_(a_t.coalesce().to_sparse_csr(), e)

    def scores(self) -> Tensor:
        """K scores (NaN: dead). Needs at least 2 images."""
        if self.n < 2:
            raise ValueError(f"the score needs at least 2 images, got {self.n}")
        lo, hi = self.lo.clone(), self.hi.clone()
        absent = self.present < self.n  # some image has the implicit activation 0
        lo[absent] = lo[absent].clamp(max=0)
        hi[absent] = hi[absent].clamp(min=0)
        span = hi - lo
        alive = span > 0
        r = torch.where(alive, span, 1)
        s1 = (self.s1 - self.n * lo) / r
        s2 = (self.s2 - 2 * lo * self.s1 + self.n * lo * lo) / (r * r)
        # ||E^T ã||^2 with E^T ã = (E^T a - lo E^T 1) / r, without a K x D temporary.
        q = (
            torch.linalg.vector_norm(self.ea, dim=1) ** 2
            - 2 * lo * (self.ea @ self.esum)
            + lo * lo * (self.esum @ self.esum)
        ) / (r * r)
        return _score(q, s1, s2, alive)
