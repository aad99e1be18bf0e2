"""Train a VL-SAE (optionally after the auxiliary alignment AE), an ablation, or a vision-only
BatchTopK / Matryoshka SAE on a collected store.

config (the settings), streams (rows by windows of shards, in batches), objectives (what each
stage minimises), metrics (what it measures), initialise, optim (schedule, mixed precision),
records (resume state, history) and loop (the trainer) hold the parts.
"""

from .config import RESUME_MAY_CHANGE, AlignConfig, TrainConfig, TrainError
from .loop import Trainer, TrainResult, train
from .metrics import firing_counts, overlap, shared_concepts
from .objectives import AlignObjective, SAEObjective, info_nce
from .optim import warmup_cosine
from .records import FREQUENCIES, HISTORY, STATE
from .streams import Streams, pair_means

__all__ = [
    "FREQUENCIES",
    "HISTORY",
    "RESUME_MAY_CHANGE",
    "STATE",
    "AlignConfig",
    "AlignObjective",
    "SAEObjective",
    "Streams",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "firing_counts",
    "info_nce",
    "overlap",
    "pair_means",
    "shared_concepts",
    "train",
    "warmup_cosine",
]
