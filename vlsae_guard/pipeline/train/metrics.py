"""What is measured: each stage's validation pass, firing frequencies, the shared concepts.

Every pass reads this rank's share of the windows and sums over ranks, so all ranks return the
same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ...core.fit import Moments
from ...core.sae import BatchTopKSAE, SparseAutoencoder
from .objectives import AlignObjective
from .streams import Streams, pair_means


def overlap(a: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """Per row, the share of ``a``'s top-k indices that are also in ``b``'s."""
    out = []
    for i in range(0, len(a), chunk):
        x, y = a[i : i + chunk], b[i : i + chunk]
        out.append((x.unsqueeze(-1) == y.unsqueeze(-2)).any(-1).float().mean(-1))
    return torch.cat(out) if out else a.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def validate_align(
    objective: AlignObjective, streams: Streams, batch_size: int, autocast: Any
) -> dict[str, float]:
    """Stage 1: the objective on validation pair means, and how often a vision projection's
    nearest text projection (within its batch) is its own caption's."""
    device = streams.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, n, chunks
    for positions in streams.mine(streams.windows("val")):
        _, v, t = pair_means(streams.load(positions, "val"))
        for i in range(0, len(v), batch_size):
            vb, tb = v[i : i + batch_size], t[i : i + batch_size]
            with autocast():
                loss, _ = objective(vb, tb)
            ev, et = objective.aux.project(vb, "vision"), objective.aux.project(tb, "text")
            hits = (ev @ et.T).argmax(-1) == torch.arange(len(vb), device=vb.device)
            sums += torch.tensor(
                [float(loss) * len(vb), float(hits.sum()), len(vb), 1], device=device
            )
    streams.dist.sum_(sums)
    n = float(sums[2].clamp_min(1))
    return {"val_loss": float(sums[0]) / n, "val_retrieval_accuracy": float(sums[1]) / n}


@torch.no_grad()
def validate_sae(sae: SparseAutoencoder, streams: Streams, autocast: Any) -> dict[str, Any]:
    """Stage 2: reconstruction error, explained variance and L0 (activations > 0) per modality
    on the validation rows, and the cross-modal overlap of each pair's top-k concepts.

    A BatchTopK SAE is measured as inference encodes once its threshold is set
    (``val_encoding: threshold``), before that with BatchTopK over chunks of 4096 rows
    (``batchtopk``); ``threshold`` records the value.
    """
    d, device, modalities = sae.config.d_in, streams.device, sae.modalities
    moments = {m: Moments(d, device) for m in modalities}
    l0 = torch.zeros(len(modalities), dtype=torch.float64, device=device)
    pairs = torch.zeros(2, dtype=torch.float64, device=device)  # overlap sum, pair count
    batch_topk = isinstance(sae, BatchTopKSAE) and float(sae.threshold) < 0
    was_training = sae.training
    sae.eval()
    for positions in streams.mine(streams.windows("val")):
        data = streams.load(positions, "val")
        for j, m in enumerate(modalities):
            for x in data[m].split(4096):
                with autocast():
                    if batch_topk:
                        recon, codes, _ = sae.forward_train(x, m)
                    else:
                        codes = sae.encode_topk(x, m)
                        recon = sae.decode(codes, m)
                moments[m].add(x, recon.float())
                l0[j] += (codes.values > 0).sum()
        if len(modalities) == 2:
            _, v, t = pair_means(data)
            top = [sae.encode_topk(x, m).indices for x, m in ((v, "vision"), (t, "text"))]
            shared = overlap(*top)
            pairs[0] += shared.sum()
            pairs[1] += len(shared)
    sae.train(was_training)
    for m in moments.values():
        streams.dist.sum_(m.sums)
    streams.dist.sum_(l0)
    streams.dist.sum_(pairs)
    metrics: dict[str, Any] = {"val_loss": sum(moments[m].mse(d) for m in modalities)}
    for j, m in enumerate(modalities):
        metrics[f"explained_variance_{m}"] = moments[m].explained_variance()
        metrics[f"l0_{m}"] = float(l0[j] / moments[m].sums[0].clamp_min(1))
    if len(modalities) == 2:
        metrics["cross_modal_overlap"] = float(pairs[0] / pairs[1].clamp_min(1))
    if isinstance(sae, BatchTopKSAE):
        metrics["val_encoding"] = "batchtopk" if batch_topk else "threshold"
        metrics["threshold"] = float(sae.threshold)
    return metrics


@torch.no_grad()
def firing_counts(sae: SparseAutoencoder, windows: Iterable[dict[str, Tensor]]) -> Tensor:
    """(modalities, n_concepts + 1) float64: per modality the SAE reads, rows each concept
    fires on, then rows seen. "Fires" = encoded (top-k or above threshold) with a non-zero
    activation.
    """
    counts = torch.zeros(len(sae.modalities), sae.n_concepts + 1, dtype=torch.float64)
    for data in windows:
        for j, m in enumerate(sae.modalities):
            for x in data[m].split(4096):
                codes = sae.encode_topk(x.to(sae.device), m)
                idx = codes.indices[codes.values > 0].cpu()
                counts[j, :-1] += torch.bincount(idx, minlength=sae.n_concepts).double()
                counts[j, -1] += len(x)
    return counts


def frequencies(sae: SparseAutoencoder, streams: Streams) -> dict[str, Tensor]:
    """Per modality, the share of training rows each concept fires on (all ranks' rows)."""
    windows = streams.mine(streams.windows("train"))
    counts = firing_counts(sae, (streams.load(p, "train") for p in windows)).to(streams.device)
    streams.dist.sum_(counts)
    freq = (counts[:, :-1] / counts[:, -1:].clamp_min(1)).float().cpu()
    return dict(zip(sae.modalities, freq, strict=True))


def shared_concepts(freq_vision: Tensor, freq_text: Tensor, threshold: float) -> list[int]:
    """Concepts firing on at least ``threshold`` of the rows of *both* modalities."""
    return torch.nonzero((freq_vision >= threshold) & (freq_text >= threshold)).flatten().tolist()
