"""What each stage minimises: modules (so that DistributedDataParallel can wrap them) that
return ``(loss, parts)``, ``parts`` being detached tensors the loop reads after the step; the
dead-concept count behind stage 2's auxiliary-k term; BatchTopK's inference threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.sae import AuxiliaryAE, BatchTopKSAE, MatryoshkaSAE, SparseAutoencoder
from ..distributed import Dist
from .config import AlignConfig


def info_nce(a: Tensor, b: Tensor, temperature: float, normalize: bool) -> Tensor:
    """Symmetric InfoNCE of paired rows: row i of ``a`` should match row i of ``b``."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class AlignObjective(nn.Module):
    """Stage 1: InfoNCE(project(v), project(t)) + MSE of both reconstructions."""

    def __init__(self, aux: AuxiliaryAE, config: AlignConfig):
        super().__init__()
        self.aux, self.config = aux, config

    def forward(self, v: Tensor, t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ev, et = self.aux.project(v, "vision"), self.aux.project(t, "text")
        nce = info_nce(ev.float(), et.float(), self.config.temperature, self.config.normalize)
        rec = F.mse_loss(self.aux.reconstruct(ev, "vision").float(), v) + F.mse_loss(
            self.aux.reconstruct(et, "text").float(), t
        )
        return nce + rec, {"info_nce": nce.detach(), "recon": rec.detach()}


class SAEObjective(nn.Module):
    """Stage 2: the sum over the SAE's modalities of MSE(recon, x), plus the auxiliary-k term on
    dead concepts. Matryoshka's MSE is the mean over its prefix reconstructions' (groups 0..g,
    uniform weights, as dictionary_learning's ``MatryoshkaBatchTopKTrainer``)."""

    def __init__(self, sae: SparseAutoencoder, k_aux: int, aux_coef: float):
        super().__init__()
        self.sae, self.k_aux, self.aux_coef = sae, k_aux, aux_coef
        self.dead: Tensor | None = None  # set by the trainer before each step

    def forward(self, *rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``rows``: a batch of each of ``sae.modalities``, in that order."""
        loss, aux_loss, fired = 0.0, 0.0, []
        parts: dict[str, Tensor] = {}
        for modality, x in zip(self.sae.modalities, rows, strict=True):
            out = self.sae.forward_train(x, modality, self.dead, self.k_aux)
            recons = [out.recon]
            if isinstance(self.sae, MatryoshkaSAE):
                recons = self.sae.prefix_reconstructions(out.codes)
            loss = loss + sum(F.mse_loss(r.float(), x) for r in recons) / len(recons)
            if out.aux_recon is not None:
                residual = (x - out.recon.float()).detach()
                aux_loss = aux_loss + F.mse_loss(out.aux_recon.float(), residual)
            fired.append(out.codes.indices[out.codes.values > 0])
            if isinstance(self.sae, BatchTopKSAE):
                parts["low"] = BatchTopKSAE.smallest_kept(out.codes)
        parts |= {"mse": loss.detach(), "fired": torch.cat(fired)}
        if torch.is_tensor(aux_loss):
            parts["aux_k"] = aux_loss.detach()
            loss = loss + self.aux_coef * aux_loss
        return loss, parts


class DeadConcepts:
    """Rows since each concept last fired on any rank (dead after ``dead_after``: the
    auxiliary-k term revives those), and which concepts fired this epoch."""

    def __init__(
        self, n_concepts: int, dead_after: int, rows_per_step: int, dist: Dist, device: torch.device
    ):
        self.dead_after, self.rows_per_step, self.dist = dead_after, rows_per_step, dist
        self.rows_since = torch.zeros(n_concepts, dtype=torch.float64, device=device)
        self.fired_epoch = torch.zeros(n_concepts, dtype=torch.bool, device=device)

    def dead(self) -> Tensor:
        return self.rows_since >= self.dead_after

    def update(self, fired: Tensor) -> None:
        """After a step; ``fired``: the concepts this rank's rows fired (indices, repeats)."""
        hit = torch.zeros(len(self.rows_since), device=self.rows_since.device)
        hit[fired] = 1
        self.dist.sum_(hit)
        hit = hit > 0
        self.rows_since += self.rows_per_step
        self.rows_since[hit] = 0
        self.fired_epoch |= hit

    def epoch_dead_fraction(self) -> float:
        """The share of concepts that never fired this epoch; starts the next epoch's count."""
        fraction = float((~self.fired_epoch).float().mean())
        self.fired_epoch.zero_()
        return fraction

    def state(self) -> dict[str, Tensor]:
        return {"rows_since": self.rows_since, "fired_epoch": self.fired_epoch}

    def restore(self, state: dict[str, Tensor]) -> None:
        self.rows_since.copy_(state["rows_since"])
        self.fired_epoch.copy_(state["fired_epoch"])


class Threshold:
    """BatchTopK's inference threshold, updated after each step from step ``start`` on
    (``BatchTopKSAE.update_threshold``: dictionary_learning's running mean, weight ``beta``).

    It reads the smallest activation BatchTopK kept on *any* rank, so every rank holds the same
    threshold (DDP would otherwise broadcast rank 0's, from rank 0's rows only, at the next
    forward). It is a buffer of the SAE: checkpoints and the resume state carry it.
    """

    def __init__(self, sae: BatchTopKSAE, beta: float, start: int, dist: Dist):
        self.sae, self.beta, self.start, self.dist = sae, beta, start, dist

    def update(self, low: Tensor, step: int) -> None:
        """After step ``step`` (0-based); ``low``: this rank's ``smallest_kept``."""
        if step < self.start:
            return
        lows = low.new_zeros(self.dist.world)  # one slot per rank: a min from a sum
        lows[self.dist.rank] = low if torch.isfinite(low) else 0  # 0: nothing fired, ignored
        self.dist.sum_(lows)
        self.sae.update_threshold(torch.where(lows > 0, lows, torch.inf).min(), self.beta)
