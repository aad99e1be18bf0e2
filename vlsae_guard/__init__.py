"""vlsae-guard: reduce object hallucination in LLaVA models with a vision-language SAE."""

from .backends import UnsupportedModelError
from .concepts.monosemanticity import monosemanticity_score
from .core.checkpoint import CheckpointError, import_official
from .core.dictionary_learning import import_dictionary_learning
from .core.fit import GuardFit, GuardFitWarning
from .core.guard import GuardError, GuardHandle, guard
from .core.intervention import GuardConfig
from .core.sae import (
    SAED,
    SAEV,
    VLSAE,
    AuxiliaryAE,
    BatchTopKSAE,
    Codes,
    MatryoshkaSAE,
    SparseAutoencoder,
    build,
)
from .core.sae_config import AuxConfig, SAEConfig, Source

__all__ = [
    "SAED",
    "SAEV",
    "VLSAE",
    "AuxConfig",
    "AuxiliaryAE",
    "BatchTopKSAE",
    "CheckpointError",
    "GuardConfig",
    "GuardError",
    "GuardFit",
    "GuardFitWarning",
    "GuardHandle",
    "UnsupportedModelError",
    "Codes",
    "MatryoshkaSAE",
    "SAEConfig",
    "Source",
    "SparseAutoencoder",
    "build",
    "guard",
    "import_dictionary_learning",
    "import_official",
    "monosemanticity_score",
]
__version__ = "0.2.0"
