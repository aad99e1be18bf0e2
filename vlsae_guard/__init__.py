"""vlsae-guard: reduce object hallucination in LLaVA models with a vision-language SAE."""

from .backends import UnsupportedModelError
from .checkpoint import CheckpointError, import_official
from .concepts.monosemanticity import monosemanticity_score
from .config import AuxConfig, SAEConfig, Source
from .guard import GuardError, GuardHandle, guard
from .intervention import GuardConfig
from .sae import SAED, SAEV, VLSAE, AuxiliaryAE, Codes, SparseAutoencoder, build

__all__ = [
    "SAED",
    "SAEV",
    "VLSAE",
    "AuxConfig",
    "AuxiliaryAE",
    "CheckpointError",
    "GuardConfig",
    "GuardError",
    "GuardHandle",
    "UnsupportedModelError",
    "Codes",
    "SAEConfig",
    "Source",
    "SparseAutoencoder",
    "build",
    "guard",
    "import_official",
    "monosemanticity_score",
]
__version__ = "0.1.0"
