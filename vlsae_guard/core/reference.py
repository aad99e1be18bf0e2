"""The VL-SAE formulas written the way the paper's official code computes them.

Kept in the library (not only in tests) so the exactness tests and ``benchmarks/perf_sae.py``
compare against one and the same baseline. Slow on purpose: ``cdist`` over all concepts,
``kthvalue`` thresholding, dense decoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sparsify(a: Tensor, k: int) -> Tensor:
    """Keep entries whose magnitude is strictly above the (n - k)-th smallest magnitude."""
    n = a.shape[-1]
    thres = torch.kthvalue(a.abs(), k=n - k, dim=-1).values.unsqueeze(-1)
    return a * (a.abs() > thres)


def activations(x: Tensor, encoder: Tensor) -> Tensor:
    """All activations ``2 - ||x/|x| - w_j/|w_j|||`` of 2-D inputs (rows x d), before TopK."""
    return 2 - torch.cdist(F.normalize(x, dim=-1), F.normalize(encoder, dim=-1), p=2)


def encode(x: Tensor, encoder: Tensor, k: int) -> Tensor:
    """Dense top-k activations ``2 - ||x/|x| - w_j/|w_j|||`` of 2-D inputs (rows x d)."""
    return sparsify(activations(x, encoder), k)


def decode(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Dense decoder, ``weight`` in our row layout (n_concepts x d)."""
    return z @ weight + bias
