"""Train a VL-SAE (optionally after the auxiliary alignment AE) on a collected store.

Data streams from the shards: each epoch visits the shards in a seeded order, ``window`` of
them at a time (loaded, filtered to the split, shuffled together), so memory holds one window,
never the store. Batches are planned from row counts alone, which makes every epoch's batches a
pure function of ``(seed, epoch)``: a resumed run skips what was done without reading it, and
``torchrun`` ranks each take a slice of the same global batch, so DDP steps stay in lockstep
and the gradient equals the single-process one.

Outputs in ``out/``: the best-validation checkpoint (``config.json``, ``model.safetensors``,
``aux.safetensors``) with the shared-concept set and statistics in its config,
``training.json`` (resolved config, store, environment, per-epoch metrics),
``concept_frequencies.safetensors`` and ``train_state.pt`` (resume state).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..core.checkpoint import load, save
from ..core.sae import AuxiliaryAE, SparseAutoencoder, build
from ..core.sae_config import AuxConfig, SAEConfig, Source
from ..outputs import write_text, write_with
from ..provenance import environment
from .distributed import Dist
from .store import MANIFEST, ActivationStore
from .train_config import RESUME_MAY_CHANGE, AlignConfig, TrainConfig

log = logging.getLogger(__name__)
STATE = "train_state.pt"
HISTORY = "training.json"
FREQUENCIES = "concept_frequencies.safetensors"


class TrainError(ValueError):
    """Training cannot start or resume; the message says why."""


# --- data -------------------------------------------------------------------------------------


def _generator(*seeds: int) -> torch.Generator:
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


class Streams:
    """Train/validation rows of a store, by windows of shards, in a reproducible order.

    The split is by pair (an image's rows never straddle it): a seeded permutation of the pair
    indices puts ``val_fraction`` of them in validation.
    """

    def __init__(
        self,
        store: ActivationStore,
        val_fraction: float,
        seed: int,
        window: int,
        dist: Dist,
        device: torch.device,
    ):
        self.store, self.seed, self.window = store, seed, window
        self.dist, self.device = dist, device
        n_pairs = store.manifest.pairs
        order = torch.randperm(n_pairs, generator=_generator(seed, 1))
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
            perm = torch.randperm(len(positions), generator=_generator(self.seed, 2, epoch))
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
        return out

    def mine(self, windows: list[list[int]]) -> Iterator[list[int]]:
        """This rank's share of ``windows`` (evaluation passes: round robin)."""
        for w, positions in enumerate(windows):
            if w % self.dist.world == self.dist.rank:
                yield positions


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


def _seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` with the global RNG seeded (for reproducible initialisation), then restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _steps(n: int, batch: int) -> int:
    return max(1, n // batch) if n else 0


# --- objectives (nn.Modules so DistributedDataParallel can wrap them) -------------------------


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


# --- metrics ------------------------------------------------------------------------------------


class _Moments:
    """Sums that give explained variance after an all-reduce: n, sum x, sum |x|^2, SSE."""

    def __init__(self, d: int, device: torch.device):
        self.sums = torch.zeros(d + 3, dtype=torch.float64, device=device)

    def add(self, x: Tensor, recon: Tensor) -> None:
        x64 = x.double()
        self.sums[0] += len(x)
        self.sums[1] += x64.pow(2).sum()
        self.sums[2] += (x64 - recon.double()).pow(2).sum()
        self.sums[3:] += x64.sum(0)

    def explained_variance(self) -> float:
        n, sq, sse, total = self.sums[0], self.sums[1], self.sums[2], self.sums[3:]
        variance = sq - total.pow(2).sum() / n.clamp_min(1)
        return float(1 - sse / variance.clamp_min(1e-30))

    def mse(self, d: int) -> float:
        return float(self.sums[2] / (self.sums[0].clamp_min(1) * d))


def overlap(a: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """Per row, the share of ``a``'s top-k indices that are also in ``b``'s."""
    out = []
    for i in range(0, len(a), chunk):
        x, y = a[i : i + chunk], b[i : i + chunk]
        out.append((x.unsqueeze(-1) == y.unsqueeze(-2)).any(-1).float().mean(-1))
    return torch.cat(out) if out else a.new_zeros(0, dtype=torch.float32)


# --- schedule and checkpoint state --------------------------------------------------------------


def warmup_cosine(total: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup * total`` steps, then cosine to zero."""
    warm = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class _Progress:
    """Where a stage is; saved in ``train_state.pt``."""

    epoch: int = 0
    step: int = 0  # steps done in the current epoch
    loss_sum: float = 0.0  # training loss summed over those steps
    global_step: int = 0
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _amp(config: TrainConfig, device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """(autocast context factory, grad scaler); mixed precision on CUDA only."""
    mode = config.amp
    if device.type != "cuda" or mode == "off":
        return nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16

    def autocast():
        return torch.autocast("cuda", dtype=dtype)

    return autocast, torch.amp.GradScaler("cuda", enabled=mode == "fp16")


# --- the trainer ------------------------------------------------------------------------------


@dataclass
class TrainResult:
    sae: SparseAutoencoder
    history: list[dict[str, Any]]
    out: Path
    is_main: bool = True  # rank 0 (the one that wrote the checkpoint)


class Trainer:
    """Runs stage 1 (optional) and stage 2, with resume, DDP, early stopping and metrics."""

    def __init__(self, config: TrainConfig, dist: Dist | None = None):
        self.config = config
        self.dist = dist or Dist.from_env()
        self.device = self.dist.device(config.device)
        self.out = Path(config.out)
        self.store = ActivationStore(config.store)
        self.manifest = self.store.manifest
        if self.manifest.site == "projector" and config.align is not None:
            raise TrainError(
                "stage 1 (align) projects each modality into a new space, but at the projector "
                "site both already share the language model's input space and the guard's "
                "projector mode reads raw projector outputs: drop the align settings"
            )
        dims = self.manifest.dims
        if config.align is None and dims["vision"] != dims["text"]:
            raise TrainError(
                f"vision rows are {dims['vision']}-d and text rows {dims['text']}-d: one SAE "
                "needs one width, so enable stage 1 (align) to project both to d_proj"
            )
        batches = {"batch_size": config.batch_size}
        if config.align is not None:
            batches["align.batch_size"] = config.align.batch_size
        for what, batch in batches.items():
            if batch % self.dist.world:
                raise TrainError(f"{what} ({batch}) must be a multiple of {self.dist.world} ranks")
        self.streams = Streams(
            self.store, config.val_fraction, config.seed, config.window, self.dist, self.device
        )
        self.autocast, _ = _amp(config, self.device)
        self.environment = environment()
        self.state = self._load_state()

    # -- resume ---------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json", exclude=set(RESUME_MAY_CHANGE))

    def _load_state(self) -> dict[str, Any] | None:
        file = self.out / STATE
        if not file.exists():
            if self.out.exists() and any(self.out.iterdir()):
                raise TrainError(f"{self.out}: exists, is not empty and holds no {STATE}")
            return None
        state = torch.load(file, map_location="cpu", weights_only=True)
        diffs = [
            f"  {k}: was {state['settings'].get(k)!r}, now {v!r}"
            for k, v in self._settings().items()
            if state["settings"].get(k) != v
        ]
        if diffs:
            raise TrainError(
                f"{file}: a run with other settings; resume it with the same settings or train "
                "into another folder\n" + "\n".join(diffs)
            )
        if state["stage"] != "done":
            log.info("resuming stage %s from %s", state["stage"], file)
        return state

    def _save_state(self, stage: str, modules: dict[str, nn.Module | Any], progress: _Progress):
        if not self.dist.is_main:
            return
        state = {
            "settings": self._settings(),
            "stage": stage,
            "progress": progress.__dict__,
            **{name: obj.state_dict() for name, obj in modules.items()},
        }
        write_with(self.out / STATE, lambda tmp: torch.save(state, tmp))

    # -- public -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if self.state is not None and self.state["stage"] == "done":
            log.info("%s: already trained; nothing to do", self.out)
            history = self.state["progress"]["history"]
            return TrainResult(load(self.out), history, self.out, self.dist.is_main)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        aux = self._stage_align() if self.config.align is not None else None
        sae = self._stage_sae(aux)
        return TrainResult(sae, self.history, self.out, self.dist.is_main)

    # -- stage 1 --------------------------------------------------------------------------------

    def _stage_align(self) -> AuxiliaryAE:
        cfg = self.config.align
        dims = self.manifest.dims
        aux_config = AuxConfig(
            d_vision=dims["vision"], d_text=dims["text"], d_proj=cfg.d_proj or dims["text"]
        )
        aux = _seeded(lambda: AuxiliaryAE(aux_config), self.config.seed).to(self.device)
        if self.state is not None and self.state["stage"] != "align":
            aux.load_state_dict(self.state["aux"])  # stage 1 finished before the interruption
            self.align_history = self.state["align_history"]
            return aux.requires_grad_(False).eval()
        objective = AlignObjective(aux, cfg)
        optimizer = torch.optim.AdamW(aux.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best = {k: v.clone() for k, v in aux.state_dict().items()}

        def batches(epoch: int, skip: int):
            return self._pair_batches(epoch, cfg.batch_size, skip)

        def validate() -> dict[str, float]:
            return self._validate_align(objective, cfg)

        def on_best() -> None:
            best.update({k: v.detach().clone() for k, v in aux.state_dict().items()})

        self._fit(
            "align",
            objective,
            optimizer,
            batches,
            validate,
            on_best,
            cfg,
            extra_state=lambda: {"aux_best": best},
            restore=lambda state: best.update(state["aux_best"]),
        )
        aux.load_state_dict(best)
        self.align_history = self.history
        self.state = None  # stage 2 starts fresh
        return aux.requires_grad_(False).eval()

    def _pair_batches(self, epoch: int, batch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
        for w, positions in enumerate(self.streams.windows("train", epoch)):
            n = self.streams.window_count("train", positions).pairs
            steps = _steps(n, batch)
            if skip >= steps:
                skip -= steps
                continue
            _, v, t = pair_means(self.streams.load(positions, "train"))
            perm = torch.randperm(len(v), generator=_generator(self.config.seed, 3, epoch, w))
            for i in range(skip, steps):
                idx = perm[(i * batch + torch.arange(batch)) % len(v)]
                idx = idx[self.dist.rank :: self.dist.world].to(self.device)
                yield v[idx], t[idx]
            skip = 0

    @torch.no_grad()
    def _validate_align(self, objective: AlignObjective, cfg: AlignConfig) -> dict[str, float]:
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, correct, n, chunks
        for positions in self.streams.mine(self.streams.windows("val")):
            _, v, t = pair_means(self.streams.load(positions, "val"))
            for i in range(0, len(v), cfg.batch_size):
                vb, tb = v[i : i + cfg.batch_size], t[i : i + cfg.batch_size]
                with self.autocast():
                    loss, _ = objective(vb, tb)
                ev, et = objective.aux.project(vb, "vision"), objective.aux.project(tb, "text")
                hits = (ev @ et.T).argmax(-1) == torch.arange(len(vb), device=vb.device)
                sums += torch.tensor(
                    [float(loss) * len(vb), float(hits.sum()), len(vb), 1], device=self.device
                )
        self.dist.sum_(sums)
        n = float(sums[2].clamp_min(1))
        return {"val_loss": float(sums[0]) / n, "val_retrieval_accuracy": float(sums[1]) / n}

    # -- stage 2 --------------------------------------------------------------------------------

    def _sae_config(self, d_in: int, aux: AuxiliaryAE | None) -> SAEConfig:
        m, cfg = self.manifest, self.config
        n = cfg.concepts(d_in)
        if cfg.k > n:
            raise TrainError(f"k ({cfg.k}) must be <= the number of concepts ({n})")
        return SAEConfig(
            architecture=cfg.architecture,
            d_in=d_in,
            n_concepts=n,
            k=cfg.k,
            source=Source(model_id=m.model_id, site=m.site, layer=m.layer, pooling=m.pooling),
            aux=aux.config if aux is not None else None,
        )

    def _stage_sae(self, aux: AuxiliaryAE | None) -> SparseAutoencoder:
        cfg = self.config
        d_in = aux.config.d_proj if aux is not None else self.manifest.dims["vision"]
        config = self._sae_config(d_in, aux)
        sae = _seeded(lambda: build(config), self.config.seed).to(self.device)
        if aux is not None:
            sae.aux = aux
        self._project = (lambda x, m: aux.project(x, m)) if aux is not None else None
        if self.state is None:
            self._initialise(sae)
        k_aux = cfg.k_aux(sae.n_concepts) if cfg.aux_k_coef > 0 else 0
        objective = SAEObjective(sae, k_aux, cfg.aux_k_coef)
        self.rows_since = torch.zeros(sae.n_concepts, dtype=torch.float64, device=self.device)
        self.fired_epoch = torch.zeros(sae.n_concepts, dtype=torch.bool, device=self.device)
        params = [p for p in sae.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        def before_step() -> None:
            objective.dead = self.rows_since >= cfg.dead_after

        def after_step(parts: dict[str, Tensor]) -> None:
            fired = torch.zeros(sae.n_concepts, device=self.device)
            fired[parts["fired"]] = 1
            self.dist.sum_(fired)
            hit = fired > 0
            self.rows_since += 2 * cfg.batch_size
            self.rows_since[hit] = 0
            self.fired_epoch |= hit

        def validate() -> dict[str, float]:
            metrics = self._validate_sae(sae)
            metrics["dead_fraction"] = float((~self.fired_epoch).float().mean())
            self.fired_epoch.zero_()
            return metrics

        def on_best() -> None:
            if self.dist.is_main:
                save(sae, self.out)

        def restore(state: dict[str, Any]) -> None:
            self.rows_since.copy_(state["rows_since"])
            self.fired_epoch.copy_(state["fired_epoch"])

        self._fit(
            "sae",
            objective,
            optimizer,
            lambda epoch, skip: self._row_batches(epoch, cfg.batch_size, skip),
            validate,
            on_best,
            cfg,
            before_step=before_step,
            after_step=after_step,
            extra_state=lambda: {
                "rows_since": self.rows_since,
                "fired_epoch": self.fired_epoch,
                "aux": aux.state_dict() if aux is not None else {},
                "align_history": getattr(self, "align_history", None) or [],
            },
            restore=restore,
        )
        self.dist.barrier()
        best = load(self.out, device=self.device)
        return self._finish(best)

    def _inputs(self, data: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._project is not None:
            with torch.no_grad():
                data["vision"] = self._project(data["vision"], "vision").float()
                data["text"] = self._project(data["text"], "text").float()
        return data

    @torch.no_grad()
    def _initialise(self, sae: SparseAutoencoder) -> None:
        """Decoder biases = data means; with ``init="data"``, concept directions = data rows.

        Drawn from the first windows of epoch 0 (the same on every rank).
        """
        rows: dict[str, list[Tensor]] = {"vision": [], "text": []}
        have = 0
        for positions in self.streams.windows("train", 0):
            data = self._inputs(self.streams.load(positions, "train"))
            for m in rows:
                rows[m].append(data[m])
            have += len(data["vision"]) + len(data["text"])
            if have >= 2 * sae.n_concepts:
                break
        data = {m: torch.cat(r) for m, r in rows.items()}
        for m in ("vision", "text"):
            sae.decoder_for(m).bias.copy_(data[m].mean(0))
        if self.config.init != "data":
            return
        gen = _generator(self.config.seed, 4)
        half = sae.n_concepts // 2
        picks = []
        for m, count in (("vision", half), ("text", sae.n_concepts - half)):
            x = data[m] - data[m].mean(0)
            idx = torch.randperm(len(x), generator=gen)[:count]
            picks.append(x[idx.to(x.device)])
        directions = torch.cat(picks)
        if len(directions) < sae.n_concepts:  # fewer rows than concepts: the rest random
            extra = torch.randn(sae.n_concepts - len(directions), sae.config.d_in, generator=gen)
            directions = torch.cat([directions, extra.to(directions)])
        unit = F.normalize(directions, dim=-1)
        for name, param in sae.named_parameters():
            if name in (
                "encoder",
                "encoder.weight",
                "vision_encoder.weight",
                "text_encoder.weight",
            ):
                param.copy_(unit if name == "encoder" else unit * (param.shape[1] ** -0.5))
        for m in ("vision", "text"):
            sae.decoder_for(m).weight.copy_(0.1 * unit)

    def _row_batches(self, epoch: int, batch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Global batches of ``batch`` rows per modality; this rank's slice of each.

        Per window, the modality with more rows sets the step count and the other one cycles.
        """
        for w, positions in enumerate(self.streams.windows("train", epoch)):
            count = self.streams.window_count("train", positions)
            steps = _steps(max(count.vision, count.text), batch)
            if skip >= steps:
                skip -= steps
                continue
            data = self._inputs(self.streams.load(positions, "train"))
            gen = _generator(self.config.seed, 5, epoch, w)
            perms = {m: torch.randperm(len(data[m]), generator=gen) for m in ("vision", "text")}
            for i in range(skip, steps):
                pick = i * batch + torch.arange(batch)
                out = []
                for m in ("vision", "text"):
                    idx = perms[m][pick % len(perms[m])][self.dist.rank :: self.dist.world]
                    out.append(data[m][idx.to(self.device)])
                yield out[0], out[1]
            skip = 0

    @torch.no_grad()
    def _validate_sae(self, sae: SparseAutoencoder) -> dict[str, float]:
        d = sae.config.d_in
        moments = {m: _Moments(d, self.device) for m in ("vision", "text")}
        extra = torch.zeros(4, dtype=torch.float64, device=self.device)  # l0 v, l0 t, overlap, n
        was_training = sae.training
        sae.eval()
        for positions in self.streams.mine(self.streams.windows("val")):
            data = self._inputs(self.streams.load(positions, "val"))
            for j, m in enumerate(("vision", "text")):
                for x in data[m].split(4096):
                    with self.autocast():
                        codes = sae.encode_topk(x, m)
                        recon = sae.decode(codes, m).float()
                    moments[m].add(x, recon)
                    extra[j] += (codes.values != 0).sum()
            _, v, t = pair_means(data)
            shared = overlap(
                sae.encode_topk(v, "vision").indices, sae.encode_topk(t, "text").indices
            )
            extra[2] += shared.sum()
            extra[3] += len(shared)
        sae.train(was_training)
        for m in moments.values():
            self.dist.sum_(m.sums)
        self.dist.sum_(extra)
        return {
            "val_loss": moments["vision"].mse(d) + moments["text"].mse(d),
            "explained_variance_vision": moments["vision"].explained_variance(),
            "explained_variance_text": moments["text"].explained_variance(),
            "l0_vision": float(extra[0] / moments["vision"].sums[0].clamp_min(1)),
            "l0_text": float(extra[1] / moments["text"].sums[0].clamp_min(1)),
            "cross_modal_overlap": float(extra[2] / extra[3].clamp_min(1)),
        }

    def _frequencies(self, sae: SparseAutoencoder) -> dict[str, Tensor]:
        """:func:`firing_counts` over this rank's training windows, summed over ranks."""
        windows = self.streams.mine(self.streams.windows("train"))
        data = (self._inputs(self.streams.load(positions, "train")) for positions in windows)
        counts = firing_counts(sae, data).to(self.device)
        self.dist.sum_(counts)
        freq = (counts[:, :-1] / counts[:, -1:].clamp_min(1)).float().cpu()
        return {"vision": freq[0], "text": freq[1]}

    def _finish(self, sae: SparseAutoencoder) -> SparseAutoencoder:
        """Shared concepts and final statistics into the best checkpoint; mark the run done."""
        freq = self._frequencies(sae)
        shared = shared_concepts(freq["vision"], freq["text"], self.config.shared_threshold)
        best = self.progress.history[self.progress.best_epoch]
        stats = {k: float(v) for k, v in best.items() if isinstance(v, int | float)}
        stats["n_shared"] = float(len(shared))
        if getattr(self, "align_history", None):
            best_align = min(self.align_history, key=lambda h: h["val_loss"])
            stats["align_val_retrieval_accuracy"] = best_align["val_retrieval_accuracy"]
        sae = sae.with_config(shared_concepts=shared, stats=stats)
        if self.dist.is_main:
            save(sae, self.out)
            write_with(
                self.out / FREQUENCIES,
                lambda tmp: save_file(
                    {"vision": freq["vision"], "text": freq["text"]},
                    tmp,
                    metadata={"threshold": str(self.config.shared_threshold)},
                ),
            )
            self._write_history(done=True)
            self._save_state("done", {}, self.progress)
        self.dist.barrier()
        log.info("shared concepts: %d of %d", len(shared), sae.n_concepts)
        return sae.cpu()

    # -- the loop ------------------------------------------------------------------------------

    def _fit(
        self,
        stage: str,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Callable[[int, int], Iterator[tuple[Tensor, Tensor]]],
        validate: Callable[[], dict[str, float]],
        on_best: Callable[[], None],
        settings: AlignConfig | TrainConfig,
        *,
        before_step: Callable[[], None] | None = None,
        after_step: Callable[[dict[str, Tensor]], None] | None = None,
        extra_state: Callable[[], dict[str, Any]] = dict,
        restore: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Epochs of one stage with early stopping, checkpoints and resume.

        ``settings`` gives the stage's epochs, warm-up, patience and batch size.
        """
        from tqdm.auto import tqdm

        epochs, patience = settings.epochs, settings.patience
        batch_size, warmup = settings.batch_size, settings.warmup

        per_epoch = [self._epoch_steps(stage, e, batch_size) for e in range(epochs)]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(sum(per_epoch), warmup)
        )
        _, scaler = _amp(self.config, self.device)
        model = objective
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(objective, device_ids=ids)
        progress = _Progress()
        modules = {"model": objective, "optimizer": optimizer, "scheduler": scheduler}
        modules["scaler"] = scaler
        if self.state is not None and self.state["stage"] == stage:
            for name, obj in modules.items():
                obj.load_state_dict(self.state[name])
            progress = _Progress(**self.state["progress"])
            if restore is not None:
                restore(self.state)
        self.progress = progress
        self.history = progress.history

        def checkpoint() -> None:
            self._save_state(stage, modules | _Stateful.wrap(extra_state()), progress)

        while progress.epoch < epochs and progress.bad_epochs < patience:
            epoch = progress.epoch
            objective.train()
            steps_here = 0
            started = time.perf_counter()
            bar = tqdm(
                total=per_epoch[epoch],
                initial=progress.step,
                desc=f"{stage} epoch {epoch + 1}/{epochs}",
                unit="step",
                disable=not (self.config.progress and self.dist.is_main),
                leave=False,
                dynamic_ncols=True,
            )
            with bar:
                for v, t in batches(epoch, progress.step):
                    if before_step is not None:
                        before_step()
                    with self.autocast():
                        loss, parts = model(v, t)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    if after_step is not None:
                        after_step(parts)
                    progress.loss_sum += float(loss.detach())
                    steps_here += 1
                    progress.step += 1
                    progress.global_step += 1
                    bar.update()
                    every = self.config.checkpoint_every
                    if every and progress.global_step % every == 0:
                        checkpoint()
            elapsed = time.perf_counter() - started
            metrics = validate()
            metrics.update(
                epoch=epoch + 1,
                train_loss=progress.loss_sum / max(1, progress.step),
                steps_per_second=steps_here / elapsed if elapsed else 0.0,
                lr=scheduler.get_last_lr()[0],
            )
            progress.history.append(metrics)
            if metrics["val_loss"] < progress.best:
                progress.best, progress.best_epoch, progress.bad_epochs = (
                    metrics["val_loss"],
                    len(progress.history) - 1,
                    0,
                )
                on_best()
            else:
                progress.bad_epochs += 1
            progress.epoch, progress.step, progress.loss_sum = epoch + 1, 0, 0.0
            self._log_epoch(stage, metrics)
            checkpoint()
            self._write_history(done=False)
            self.dist.barrier()
        if progress.bad_epochs >= patience:
            log.info("%s: early stop after epoch %d (patience %d)", stage, progress.epoch, patience)

    def _epoch_steps(self, stage: str, epoch: int, batch: int) -> int:
        total = 0
        for positions in self.streams.windows("train", epoch):
            c = self.streams.window_count("train", positions)
            total += _steps(c.pairs if stage == "align" else max(c.vision, c.text), batch)
        return total

    def _log_epoch(self, stage: str, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "lr"))
        log.info("%s epoch %d: %s", stage, metrics["epoch"], shown)

    def _write_history(self, done: bool) -> None:
        if not self.dist.is_main:
            return
        record = {
            "done": done,
            "config": self.config.model_dump(mode="json"),
            "store": {
                "path": str(self.store.directory.resolve()),
                "model_id": self.manifest.model_id,
                "site": self.manifest.site,
                "layer": self.manifest.layer,
                "pooling": self.manifest.pooling,
                "dataset_fingerprint": self.manifest.dataset_fingerprint,
                "counts": self.manifest.counts.model_dump(),
                "manifest": str((self.store.directory / MANIFEST).resolve()),
            },
            "split": {split: self.streams.total(split).__dict__ for split in ("train", "val")},
            "world_size": self.dist.world,
            "align_history": getattr(self, "align_history", None),
            "history": self.progress.history,
            "best_epoch": self.progress.best_epoch + 1,
            "environment": self.environment,
        }
        write_text(self.out / HISTORY, json.dumps(record, indent=2) + "\n")


class _Stateful:
    """Gives plain tensors / dicts the ``state_dict`` interface of the checkpointed modules."""

    def __init__(self, value: Any):
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    @classmethod
    def wrap(cls, values: dict[str, Any]) -> dict[str, _Stateful]:
        return {k: cls(v) for k, v in values.items()}


@torch.no_grad()
def firing_counts(sae: SparseAutoencoder, windows: Iterable[dict[str, Tensor]]) -> Tensor:
    """(2, n_concepts + 1) float64: per modality, rows each concept fires on, then rows seen.

    "Fires" = among the row's top-k with a non-zero activation.
    """
    counts = torch.zeros(2, sae.n_concepts + 1, dtype=torch.float64)
    for data in windows:
        for j, m in enumerate(("vision", "text")):
            for x in data[m].split(4096):
                codes = sae.encode_topk(x.to(sae.device), m)
                idx = codes.indices[codes.values > 0].cpu()
                counts[j, :-1] += torch.bincount(idx, minlength=sae.n_concepts).double()
                counts[j, -1] += len(x)
    return counts


def shared_concepts(freq_vision: Tensor, freq_text: Tensor, threshold: float) -> list[int]:
    """Concepts firing on at least ``threshold`` of the rows of *both* modalities."""
    return torch.nonzero((freq_vision >= threshold) & (freq_text >= threshold)).flatten().tolist()


def train(config: TrainConfig, dist: Dist | None = None) -> TrainResult:
    """Run both stages as ``config`` says; resumes from ``out/train_state.pt`` when present."""
    return Trainer(config, dist).run()
