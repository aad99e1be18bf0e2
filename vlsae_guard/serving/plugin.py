"""The ``vllm.general_plugins`` entry point: register the guarded LLaVA architectures.

vLLM calls :func:`register` in every process it starts (API server, engine core, each worker),
possibly more than once, so it is idempotent and cheap: the classes are registered as
``"module:Class"`` strings that vLLM imports only when a model asks for one of these names.
Registering changes nothing by itself; a model uses the guard only when its architecture is
overridden to one of :data:`GUARDED` (``vlsae-guard serve`` does that).
"""

from __future__ import annotations

# Architecture of the checkpoint -> the guarded architecture that replaces it.
GUARDED = {
    "LlavaForConditionalGeneration": "VLSAEGuardLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "VLSAEGuardLlavaNextForConditionalGeneration",
}
MODEL_MODULE = "vlsae_guard.serving.model"


def register() -> None:
    """Register every guarded architecture that vLLM does not know yet."""
    from vllm import ModelRegistry

    known = ModelRegistry.get_supported_archs()
    for name in GUARDED.values():
        if name not in known:
            ModelRegistry.register_model(name, f"{MODEL_MODULE}:{name}")
