"""The guard inside lmms-eval (EvolvingLMMs-Lab/lmms-eval, 0.7.x): the model ``vlsae_llava``.

Every lmms-eval task then runs with any inference method of :mod:`vlsae_guard.methods` on or off,
answered through the project's backends (:mod:`vlsae_guard.harness.generation`), so an answer
equals ``benchmarks/pope.py``'s for the same settings. lmms-eval 0.7 finds models through its
model registry (manifests), not by importing files given with ``--include_path``: installed, the
package's entry point (``lmms_eval.models``: :func:`manifest`) registers ``vlsae_guard``'s
model; ``python -m vlsae_guard.lmms_eval`` registers it itself and runs lmms-eval's command line
(so it works from a source tree too). Nothing here imports lmms-eval until it is used.
"""

from __future__ import annotations

MODEL_NAME = "vlsae_llava"
CLASS_PATH = "vlsae_guard.lmms_eval.model.VLSAELlava"


def manifest():
    """lmms-eval's declaration of the model (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Add the model to lmms-eval's registry in this process (what the entry point does when
    the package is installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
