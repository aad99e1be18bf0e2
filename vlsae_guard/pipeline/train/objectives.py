"""What each stage minimises: modules (so that DistributedDataParallel can wrap them) that
return ``(loss, parts)``, ``parts`` being detached tensors the loop reads after the step; and
the dead-concept count behind stage 2's auxiliary-k term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.sae import AuxiliaryAE, SparseAutoencoder
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
    """Stage 2: MSE(recon_v, v) + MSE(recon_t, t), plus the auxiliary-k term on dead concepts."""

    def __init__(self, sae: SparseAutoencoder, k_aux: int, aux_coef: float):
        super().__init__()
        self.sae, self.k_aux, self.aux_coef = sae, k_aux, aux_coef
        self.dead: Tensor | None = None  # set by the trainer before each step

    def forward(self, v: Tensor, t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, aux_loss, fired = 0.0, 0.0, []
        for modality, x in (("vision", v), ("text", t)):
            out = self.sae.forward_train(x, modality, self.dead, self.k_aux)
            loss = loss + F.mse_loss(out.recon.float(), x)
            if out.aux_recon is not None:
                residual = (x - out.recon.float()).detach()
                aux_loss = aux_loss + F.mse_loss(out.aux_recon.float(), residual)
            fired.append(out.codes.indices[out.codes.values > 0])
        parts = {"mse": loss.detach(), "fired": torch.cat(fired)}
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
