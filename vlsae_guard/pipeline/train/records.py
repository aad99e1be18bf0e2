"""What a run writes besides the checkpoint: the resume state, the history, the frequencies.

``train_state.pt`` holds where each stage is (and the optimiser, scheduler, ...), so a killed
run goes on exactly; ``training.json`` says how the checkpoint was made;
``concept_frequencies.safetensors`` is what the shared-concept set was chosen from. Rank 0
writes them all.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ...outputs import write_text, write_with
from ..store import MANIFEST, ActivationStore
from .config import RESUME_MAY_CHANGE, TrainConfig, TrainError
from .streams import Streams

log = logging.getLogger(__name__)
STATE = "train_state.pt"
HISTORY = "training.json"
FREQUENCIES = "concept_frequencies.safetensors"


@dataclass
class Progress:
    """Where a stage is; saved in ``train_state.pt``."""

    epoch: int = 0
    step: int = 0  # steps done in the current epoch
    loss_sum: float = 0.0  # training loss summed over those steps
    global_step: int = 0
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def end_epoch(self, metrics: dict[str, Any]) -> bool:
        """Record an epoch's metrics; True when its validation loss is the best so far."""
        self.history.append(metrics)
        better = metrics["val_loss"] < self.best
        if better:
            self.best, self.best_epoch, self.bad_epochs = (
                metrics["val_loss"],
                len(self.history) - 1,
                0,
            )
        else:
            self.bad_epochs += 1
        self.epoch, self.step, self.loss_sum = self.epoch + 1, 0, 0.0
        return better


class Stateful:
    """Gives plain tensors / dicts the ``state_dict`` interface of the checkpointed modules."""

    def __init__(self, value: Any):
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    @classmethod
    def wrap(cls, values: dict[str, Any]) -> dict[str, Stateful]:
        return {k: cls(v) for k, v in values.items()}


class Resume:
    """``out/train_state.pt``: read on every rank, written by rank 0.

    A state written under other settings (bar :data:`RESUME_MAY_CHANGE`) is refused, and so is
    a non-empty ``out`` without one: it may hold another run.
    """

    def __init__(self, config: TrainConfig, is_main: bool):
        self.out = Path(config.out)
        self.file = self.out / STATE
        self.settings = config.model_dump(mode="json", exclude=set(RESUME_MAY_CHANGE))
        self.is_main = is_main

    def load(self) -> dict[str, Any] | None:
        if not self.file.exists():
            if self.out.exists() and any(self.out.iterdir()):
                raise TrainError(f"{self.out}: exists, is not empty and holds no {STATE}")
            return None
        state = torch.load(self.file, map_location="cpu", weights_only=True)
        # A field added since the state was written reads as its default (what the run did).
        fields = TrainConfig.model_fields
        was = {k: state["settings"].get(k, fields[k].get_default()) for k in self.settings}
        diffs = [
            f"  {k}: was {was[k]!r}, now {v!r}" for k, v in self.settings.items() if was[k] != v
        ]
        if diffs:
            raise TrainError(
                f"{self.file}: a run with other settings; resume it with the same settings or "
                "train into another folder\n" + "\n".join(diffs)
            )
        if state["stage"] != "done":
            log.info("resuming stage %s from %s", state["stage"], self.file)
        return state

    def save(self, stage: str, modules: dict[str, Any], progress: Progress) -> None:
        """``modules``: anything with ``state_dict()`` (modules, optimiser, :class:`Stateful`)."""
        if not self.is_main:
            return
        state = {
            "settings": self.settings,
            "stage": stage,
            "progress": progress.__dict__,
            **{name: obj.state_dict() for name, obj in modules.items()},
        }
        write_with(self.file, lambda tmp: torch.save(state, tmp))


def write_history(
    config: TrainConfig,
    store: ActivationStore,
    streams: Streams,
    progress: Progress,
    *,
    done: bool,
    align_history: list[dict[str, Any]] | None,
    environment: dict[str, Any],
) -> None:
    """``training.json``: the resolved config, the store, the split, both stages' epochs."""
    manifest = store.manifest
    record = {
        "done": done,
        "config": config.model_dump(mode="json"),
        "store": {
            "path": str(store.directory.resolve()),
            "model_id": manifest.model_id,
            "site": manifest.site,
            "layer": manifest.layer,
            "pooling": manifest.pooling,
            "dataset_fingerprint": manifest.dataset_fingerprint,
            "counts": manifest.counts.model_dump(),
            "manifest": str((store.directory / MANIFEST).resolve()),
        },
        "split": {split: streams.total(split).__dict__ for split in ("train", "val")},
        "world_size": streams.dist.world,
        "align_history": align_history,
        "history": progress.history,
        "best_epoch": progress.best_epoch + 1,
        "environment": environment,
    }
    write_text(Path(config.out) / HISTORY, json.dumps(record, indent=2) + "\n")


def write_frequencies(out: Path, freq: dict[str, Tensor], threshold: float | None) -> None:
    """Per modality, the share of training rows each concept fires on; ``threshold``: the one
    the shared-concept set was chosen with (None: a vision-only SAE has no such set)."""
    metadata = None if threshold is None else {"threshold": str(threshold)}
    write_with(out / FREQUENCIES, lambda tmp: save_file(freq, tmp, metadata=metadata))
