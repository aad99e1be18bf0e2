"""The trainer: stage 1 (optional), stage 2, and the epoch loop both share.

Outputs in ``out/``: the best-validation checkpoint (``config.json``, ``model.safetensors``,
``aux.safetensors``) with the shared-concept set and statistics in its config, and the
:mod:`~vlsae_guard.pipeline.train.records` (``training.json``,
``concept_frequencies.safetensors``, ``train_state.pt``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...core.checkpoint import load, save
from ...core.sae import AuxiliaryAE, BatchTopKSAE, SparseAutoencoder, build
from ...core.sae_config import AuxConfig, Source
from ...provenance import environment
from ..distributed import Dist
from ..store import ActivationStore
from .config import AlignConfig, TrainConfig
from .initialise import initialise, seeded
from .metrics import frequencies, shared_concepts, validate_align, validate_sae
from .objectives import AlignObjective, DeadConcepts, SAEObjective, Threshold
from .optim import amp, warmup_cosine
from .records import Progress, Resume, Stateful, write_frequencies, write_history
from .streams import Streams

log = logging.getLogger(__name__)


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
        config.check_fits(self.manifest, self.dist.world)
        self.streams = Streams(
            self.store,
            config.val_fraction,
            config.seed,
            config.window,
            self.dist,
            self.device,
            config.modalities,
        )
        self.autocast, _ = amp(config.amp, self.device)
        self.environment = environment()
        self.resume = Resume(config, self.dist.is_main)
        self.state = self.resume.load()
        self.align_history: list[dict[str, Any]] | None = None

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
        return TrainResult(sae, self.progress.history, self.out, self.dist.is_main)

    # -- stage 1 --------------------------------------------------------------------------------

    def _stage_align(self) -> AuxiliaryAE:
        cfg = self.config.align
        dims = self.manifest.dims
        aux_config = AuxConfig(
            d_vision=dims["vision"], d_text=dims["text"], d_proj=cfg.d_proj or dims["text"]
        )
        aux = seeded(lambda: AuxiliaryAE(aux_config), self.config.seed).to(self.device)
        if self.state is not None and self.state["stage"] != "align":
            aux.load_state_dict(self.state["aux"])  # stage 1 finished before the interruption
            self.align_history = self.state["align_history"]
            return aux.requires_grad_(False).eval()
        objective = AlignObjective(aux, cfg)
        optimizer = torch.optim.AdamW(aux.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best = {k: v.clone() for k, v in aux.state_dict().items()}

        def on_best() -> None:
            best.update({k: v.detach().clone() for k, v in aux.state_dict().items()})

        self._fit(
            "align",
            objective,
            optimizer,
            lambda epoch, skip: self.streams.pair_batches(epoch, cfg.batch_size, skip),
            lambda: validate_align(objective, self.streams, cfg.batch_size, self.autocast),
            on_best,
            cfg,
            extra_state=lambda: {"aux_best": best},
            restore=lambda state: best.update(state["aux_best"]),
        )
        aux.load_state_dict(best)
        self.align_history = self.progress.history
        self.state = None  # stage 2 starts fresh
        return aux.requires_grad_(False).eval()

    # -- stage 2 --------------------------------------------------------------------------------

    def _stage_sae(self, aux: AuxiliaryAE | None) -> SparseAutoencoder:
        cfg, m = self.config, self.manifest
        d_in = aux.config.d_proj if aux is not None else m.dims["vision"]
        # Stores that predate the recorded point were read at the layer's input as well.
        point = m.point or ("input" if m.site == "layer" else None)
        source = Source(
            model_id=m.model_id, site=m.site, layer=m.layer, point=point, pooling=m.pooling
        )
        config = cfg.sae_config(d_in, source, aux.config if aux is not None else None)
        sae = seeded(lambda: build(config), cfg.seed).to(self.device)
        if aux is not None:
            sae.aux = aux
            self.streams.project = aux.project
        if self.state is None:
            initialise(sae, self.streams, cfg.init, cfg.seed)
        k_aux = cfg.k_aux(sae.n_concepts) if cfg.aux_k_coef > 0 else 0
        objective = SAEObjective(sae, k_aux, cfg.aux_k_coef)
        dead = DeadConcepts(
            sae.n_concepts, cfg.dead_after, 2 * cfg.batch_size, self.dist, self.device
        )
        params = [p for p in sae.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        threshold = None
        if isinstance(sae, BatchTopKSAE):
            threshold = Threshold(sae, cfg.threshold_beta, cfg.threshold_start, self.dist)

        def before_step() -> None:
            objective.dead = dead.dead()

        def after_step(parts: dict[str, Tensor]) -> None:
            dead.update(parts["fired"])
            if threshold is not None:  # progress.global_step: the step just taken, from 0
                threshold.update(parts["low"], self.progress.global_step)

        def validate() -> dict[str, Any]:
            metrics = validate_sae(sae, self.streams, self.autocast)
            metrics["dead_fraction"] = dead.epoch_dead_fraction()
            return metrics

        def on_best() -> None:
            if self.dist.is_main:
                save(sae, self.out)

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
                **dead.state(),
                "aux": aux.state_dict() if aux is not None else {},
                "align_history": self.align_history or [],
            },
            restore=dead.restore,
        )
        self.dist.barrier()
        best = load(self.out, device=self.device)
        return self._finish(best)

    def _row_batches(self, epoch: int, batch: int, skip: int) -> Iterator[tuple[Tensor, ...]]:
        """Stage 2's batches (a method, so that a test can watch what each rank is fed)."""
        return self.streams.row_batches(epoch, batch, skip)

    def _finish(self, sae: SparseAutoencoder) -> SparseAutoencoder:
        """Shared concepts (SAEs of both modalities) and final statistics into the best
        checkpoint; mark the run done."""
        freq = frequencies(sae, self.streams)
        best = self.progress.history[self.progress.best_epoch]
        stats = {k: float(v) for k, v in best.items() if isinstance(v, int | float)}
        shared, cut = None, None
        if len(sae.modalities) == 2:
            cut = self.config.shared_threshold
            shared = shared_concepts(freq["vision"], freq["text"], cut)
            stats["n_shared"] = float(len(shared))
            log.info("shared concepts: %d of %d", len(shared), sae.n_concepts)
        elif float(sae.threshold) < 0:
            log.warning(
                "the threshold was never set (%d steps, threshold_start %d): inference keeps "
                "every positive activation",
                self.progress.global_step,
                self.config.threshold_start,
            )
        if self.align_history:
            best_align = min(self.align_history, key=lambda h: h["val_loss"])
            stats["align_val_retrieval_accuracy"] = best_align["val_retrieval_accuracy"]
        sae = sae.with_config(shared_concepts=shared, stats=stats)
        if self.dist.is_main:
            save(sae, self.out)
            write_frequencies(self.out, freq, cut)
            self._write_history(done=True)
            self.resume.save("done", {}, self.progress)
        self.dist.barrier()
        return sae.cpu()

    # -- the loop ------------------------------------------------------------------------------

    def _fit(
        self,
        stage: str,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Callable[[int, int], Iterator[tuple[Tensor, ...]]],
        validate: Callable[[], dict[str, Any]],
        on_best: Callable[[], None],
        settings: AlignConfig | TrainConfig,
        *,
        before_step: Callable[[], None] | None = None,
        after_step: Callable[[dict[str, Tensor]], None] | None = None,
        extra_state: Callable[[], dict[str, Any]] = dict,
        restore: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Epochs of one stage with early stopping, checkpoints and resume.

        ``settings`` gives the stage's epochs, warm-up, patience and batch size;
        ``batches(epoch, skip)`` the epoch's batches after the first ``skip`` (each a tuple of
        the objective's arguments).
        """
        from tqdm.auto import tqdm

        epochs, patience = settings.epochs, settings.patience
        batch_size, warmup = settings.batch_size, settings.warmup

        unit = "pair" if stage == "align" else "row"
        per_epoch = [self.streams.epoch_steps(e, batch_size, unit) for e in range(epochs)]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(sum(per_epoch), warmup)
        )
        _, scaler = amp(self.config.amp, self.device)
        model = objective
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(objective, device_ids=ids)
        progress = Progress()
        modules = {"model": objective, "optimizer": optimizer, "scheduler": scheduler}
        modules["scaler"] = scaler
        if self.state is not None and self.state["stage"] == stage:
            for name, obj in modules.items():
                obj.load_state_dict(self.state[name])
            progress = Progress(**self.state["progress"])
            if restore is not None:
                restore(self.state)
        self.progress = progress

        def checkpoint() -> None:
            self.resume.save(stage, modules | Stateful.wrap(extra_state()), progress)

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
                for batch in batches(epoch, progress.step):
                    if before_step is not None:
                        before_step()
                    with self.autocast():
                        loss, parts = model(*batch)
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
            if progress.end_epoch(metrics):
                on_best()
            self._log_epoch(stage, metrics)
            checkpoint()
            self._write_history(done=False)
            self.dist.barrier()
        if progress.bad_epochs >= patience:
            log.info("%s: early stop after epoch %d (patience %d)", stage, progress.epoch, patience)

    def _log_epoch(self, stage: str, metrics: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k not in ("epoch", "lr")
        )
        log.info("%s epoch %d: %s", stage, metrics["epoch"], shown)

    def _write_history(self, done: bool) -> None:
        if self.dist.is_main:
            write_history(
                self.config,
                self.store,
                self.streams,
                self.progress,
                done=done,
                align_history=self.align_history,
                environment=self.environment,
            )


def train(config: TrainConfig, dist: Dist | None = None) -> TrainResult:
    """Run both stages as ``config`` says; resumes from ``out/train_state.pt`` when present."""
    return Trainer(config, dist).run()
