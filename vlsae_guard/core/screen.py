"""The VL-SAE's exact top-k below the float32 GEMM: a certified bfloat16 screen.

A VL-SAE's active concepts are each token's k largest cosines with the encoder's rows, so an
exact encode reads every concept: one ``tokens x d x concepts`` float32 GEMM, the floor of
``benchmarks/perf_sae.py``. Where bfloat16 products run several times faster (Intel AMX: 5x on
the CPU this was measured on), :class:`ScreenedSearch` first computes every cosine in bfloat16
and bounds that product's error from quantities it knows exactly. It then computes in float32
(a sampled product, concept by concept) the screen's own top k of each token, whose smallest
exact value is a lower bound of the token's true k-th largest, and every other concept whose
screen value plus bound still reaches it; the k largest of those are the answer. Every concept
of the float32 top-k is among them, so the result is the full search's: the same concepts (ties
within float32 rounding aside) and float32 values.

The bound, for a token's unit row ``x`` and a concept's unit row ``w`` (float32), their bfloat16
roundings ``x~, w~``, the screen's value ``s~`` and the width ``D``::

    |x.w - s~| <= ||x - x~|| max||w|| + ||x~|| (max||w - w~|| + g_D max||w~||) + r |s~| + eta

by Cauchy-Schwarz on ``x.w - x~.w~ = (x - x~).w + x~.(w - w~)``; ``g_D = D u / (1 - D u)``
bounds a float32 sum of D exact products in any order (Higham, "Accuracy and Stability of
Numerical Algorithms", 2nd ed., 2002, section 3.1; a product of two bfloat16 numbers is exact
in float32); ``r = 2^-8 / (1 - 2^-8)`` the rounding of the output to bfloat16; ``eta`` covers
the float32 normalisations. It assumes what AMX (TDPBF16PS) and AVX512-BF16 do: float32
accumulation, round-to-nearest. Each call checks it a posteriori on every candidate (their
exact values are known); a miss (an encoder changed since the screen was built, say) falls
back to the full search with a warning.

Deviations and limits: the bound is a worst case, about ten times the error seen on random
rows, so the screen wins only when few concepts crowd the k-th cosine (it reports how many it
rescored); CPU only (cuBLAS may reduce bfloat16 products in reduced precision, which the bound
does not cover); float32 VL-SAEs only (a half-precision SAE's full search is already half).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .sae import VLSAE, Codes, SparseAutoencoder

_U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_U_FP32 = 2.0**-24
_ETA = 1e-6  # float32 normalisation and rescoring rounding (observed about 1e-7)
_BUILD_ROWS = 4096  # encoder rows per float64 pass when building (bounded memory)


class ScreenWarning(UserWarning):
    """The screen's bound missed (or the encoder changed): that call ran the full search."""


@dataclass
class ScreenStats:
    """What the last call did: rows, concepts rescored per row, whether it fell back."""

    rows: int = 0
    rescored_per_row: float = 0.0
    fell_back: bool = False


def check_screenable(sae: SparseAutoencoder) -> None:
    """Refuse what the screen's bound does not cover (:class:`ValueError`, nothing built)."""
    if not isinstance(sae, VLSAE):
        raise ValueError(
            f"search='screened' needs a VL-SAE (cosine scores); got architecture "
            f"{sae.config.architecture!r}: use search='full'"
        )
    if sae.dtype != torch.float32:
        raise ValueError(
            f"search='screened' screens a float32 SAE in bfloat16; this SAE computes in "
            f"{sae.dtype} (cast it to float32, or use search='full')"
        )
    if sae.device.type != "cpu":
        raise ValueError(
            f"search='screened' runs on CPUs only (the SAE is on {sae.device}): cuBLAS may "
            "reduce bfloat16 products in reduced precision, which its bound does not cover"
        )


class ScreenedSearch:
    """A VL-SAE's encoder in bfloat16 with its rounding bounds, for :meth:`encode_topk`.

    A snapshot: built once (the guard builds it when attached), it screens with the encoder
    as it was then. A later change usually fails the a-posteriori check (the full search then
    answers) but need not: attach the guard again after changing the SAE. Costs a bfloat16
    copy of the encoder (half its float32 size).
    """

    def __init__(self, sae: SparseAutoencoder):
        check_screenable(sae)
        self.sae = sae
        with torch.no_grad():
            w = sae.encoder.detach()
            # The full search's scale of each concept, computed as VLSAE._scores does.
            self.inv_norm = torch.linalg.vector_norm(w, dim=-1).clamp_min(1e-12).reciprocal()
            self.unit = (w * self.inv_norm[:, None]).bfloat16()
            bounds = [_row_bounds(w[i : i + _BUILD_ROWS], self.unit[i : i + _BUILD_ROWS])
                      for i in range(0, len(w), _BUILD_ROWS)]  # fmt: skip
        self.unit_norm = max(b[0] for b in bounds)  # max ||w||
        self.rounding = max(b[1] for b in bounds)  # max ||w - w~||
        self.screen_norm = max(b[2] for b in bounds)  # max ||w~||
        self.stats = ScreenStats()

    @torch.no_grad()
    def encode_topk(self, x: Tensor) -> Codes:
        """``sae.encode_topk(x, "vision")``, screened (see the module docstring)."""
        sae, k = self.sae, self.sae.k
        if x.shape[-1] != sae.config.d_in:
            raise ValueError(f"expected inputs with last dim {sae.config.d_in}, got {x.shape}")
        shape = (*x.shape[:-1], k)
        rows = F.normalize(x.reshape(-1, x.shape[-1]).to(sae.dtype), dim=-1)
        if len(rows) == 0 or 2 * k > sae.n_concepts or not bool(rows.isfinite().all()):
            return sae.encode_topk(x, "vision")  # nothing to screen out, or NaN/inf inputs
        if sae.dtype != torch.float32 or sae.device.type != "cpu":
            return self._fall_back(x, f"the SAE is now {sae.dtype} on {sae.device}")
        low = rows.bfloat16()
        screen = low @ self.unit.t()
        slack = self._slack(rows, low)
        # Pass 1: the screen's own top k in float32. Their smallest exact value is a lower
        # bound of the row's k-th largest, much tighter than the screen's k-th minus its bound.
        first = screen.topk(k, dim=-1, sorted=False).indices
        own = torch.arange(len(rows)).repeat_interleave(k)
        exact = self._cosines(rows, own, first.view(-1))
        cut = _candidate_cut(exact.view(-1, k).amin(-1).double() - _ETA, slack)
        # Pass 2: every other concept whose upper bound reaches it.
        more = (screen >= cut[:, None]).scatter_(1, first, False)
        tokens, concepts = more.nonzero(as_tuple=True)  # token-major
        extra = self._cosines(rows, tokens, concepts)
        if not (
            _within_bound(screen, slack, own, first.view(-1), exact)
            and _within_bound(screen, slack, tokens, concepts, extra)
        ):
            why = "the bfloat16 screen's bound missed (or the encoder changed since it was built)"
            return self._fall_back(x, why)
        values, indices = _top_per_row(exact.view(-1, k), first, extra, tokens, concepts, k)
        self.stats = ScreenStats(len(rows), k + len(tokens) / len(rows), False)
        return Codes(sae._activation(values).reshape(shape), indices.reshape(shape), sae.n_concepts)

    def _cosines(self, rows: Tensor, tokens: Tensor, concepts: Tensor) -> Tensor:
        """float32 cosines of the pairs, computed as the full search computes them."""
        return _sampled_dots(rows, self.sae.encoder.detach(), tokens, concepts).mul_(
            self.inv_norm[concepts]
        )

    def _fall_back(self, x: Tensor, why: str) -> Codes:
        """The full search, saying why the screen could not answer this call."""
        warnings.warn(f"{why}: this call ran the full search", ScreenWarning, stacklevel=3)
        self.stats = ScreenStats(x.numel() // x.shape[-1], 0.0, True)
        return self.sae.encode_topk(x, "vision")

    def _slack(self, rows: Tensor, low: Tensor) -> Tensor:
        """Per token, the bound's terms that do not depend on the screen's value (float64);
        ``low``: the rows in bfloat16. ``rows - low`` is exact in float32 (a value minus its
        own rounding), and a float32 norm is within ``(1 + gamma)`` of the exact one."""
        d = rows.shape[-1]
        gamma = d * _U_FP32 / (1 - d * _U_FP32)
        high = low.float()
        lost, norm = (torch.linalg.vector_norm(t, dim=-1).double() * (1 + gamma)
                      for t in (rows - high, high))  # fmt: skip
        return lost * self.unit_norm + norm * (self.rounding + gamma * self.screen_norm) + _ETA


_R = _U_BF16 / (1 - _U_BF16)  # the output's rounding, relative to the bfloat16 value


def _row_bounds(w: Tensor, unit: Tensor) -> tuple[float, float, float]:
    """max ||w/|w| ||, max ||w/|w| - w~||, max ||w~|| over these rows, in float64."""
    exact = F.normalize(w.double(), dim=-1, eps=1e-12)
    low = unit.double()
    norms = (torch.linalg.vector_norm(t, dim=-1).max().item() for t in (exact, exact - low, low))
    return tuple(norms)  # type: ignore[return-value]


def _candidate_cut(lower: Tensor, slack: Tensor) -> Tensor:
    """The smallest bfloat16 screen value whose upper bound reaches ``lower`` (per row).

    ``s + slack + r|s|`` grows with ``s``, so the candidates of a row are the screen values at
    or above one cut, rounded down to bfloat16 so that no candidate is lost to the rounding.
    """
    y = lower - slack
    cut = torch.where(y >= 0, y / (1 + _R), y / (1 - _R))
    rounded = cut.to(torch.bfloat16)
    below = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=torch.bfloat16))
    return torch.where(rounded.double() > cut, below, rounded)


def _within_bound(
    screen: Tensor, slack: Tensor, tokens: Tensor, concepts: Tensor, exact: Tensor
) -> bool:
    """Whether the exact values of the (token, concept) pairs lie within the bound of their
    screen values."""
    got = screen[tokens, concepts].double()
    return bool(((exact.double() - got).abs() <= slack[tokens] + _R * got.abs()).all())


def _sampled_dots(rows: Tensor, encoder: Tensor, tokens: Tensor, concepts: Tensor) -> Tensor:
    """float32 ``rows[t] . encoder[c]`` of the (token, concept) pairs, in their order; concept
    by concept, so that each encoder row is read once (twice as fast as token by token)."""
    n, m = encoder.shape[0], rows.shape[0]
    order = torch.argsort(concepts, stable=True)  # tokens stay sorted within a concept
    crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(concepts, minlength=n).cumsum(0)
    with warnings.catch_warnings():  # torch's one-time "CSR support is in beta" notice
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, tokens[order], rows.new_zeros(len(tokens)), size=(n, m), check_invariants=False
        )
    dots = torch.empty_like(pattern.values())
    dots[order] = torch.sparse.sampled_addmm(pattern, encoder, rows.t(), beta=0.0).values()
    return dots


def _top_per_row(
    first: Tensor, first_ids: Tensor, extra: Tensor, tokens: Tensor, concepts: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Each row's k largest of its first-pass values ``(rows, k)`` and its extra pairs (flat,
    in token order), with their concept ids."""
    rows = len(first)
    counts = torch.bincount(tokens, minlength=rows)
    slot = k + torch.arange(len(tokens)) - (counts.cumsum(0) - counts)[tokens]
    width = k + (int(counts.max()) if len(tokens) else 0)
    padded = first.new_full((rows, width), -math.inf)
    padded[:, :k] = first
    padded[tokens, slot] = extra
    ids = first_ids.new_zeros((rows, width))
    ids[:, :k] = first_ids
    ids[tokens, slot] = concepts
    top, pos = padded.topk(k, dim=-1, sorted=False)
    return top, ids.gather(-1, pos)
