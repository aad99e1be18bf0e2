"""Run the original LLaVA package (PyPI ``llava-torch`` 1.2.x) on our torch/transformers pins.

Its wheel pins torch 2.0.1 and transformers 4.36, so it is installed with ``--no-deps`` (plus
``requirements/llava.txt``) and its model code runs on transformers 5. Under 5.19 the model,
``load_pretrained_model``, ``tokenizer_image_token``, ``process_images`` and ``generate`` work
unchanged; two things need help, one shim each:

1. ``llava/model/__init__.py`` wraps its imports in a bare ``try/except: pass``, so a missing
   dependency shows up later as an unrelated ``cannot import name 'LlavaLlamaForCausalLM'``.
   We import the defining module directly so the real error is raised, with an install hint.
2. transformers 5 records ``output_hidden_states`` with forward hooks that each model installs
   lazily, on first use, over its whole module tree, including nested models, which it
   re-hooks even when they already hooked themselves. In the original LLaVA the CLIP tower
   is *inside* the Llama model (``model.vision_tower.vision_tower``) and always runs with
   ``output_hidden_states=True``, so the first language-model call with
   ``output_hidden_states=True`` after an image was encoded doubles every CLIP layer's hook:
   ``hidden_states`` gets ``2L + 1`` entries and ``hidden_states[-2]``
   (``mm_vision_select_layer``) silently becomes another layer. We make the installation
   idempotent per model. llava-hf models are not affected (there the tower is a sibling of
   the language model), and skipping a model that is already hooked only avoids duplicates.
"""

from __future__ import annotations

import functools
import importlib

_INSTALL_HINT = (
    "the original LLaVA code is not importable: install it with "
    "`pip install --no-deps llava-torch==1.2.2.post1 -r requirements/llava.txt`"
)


def ensure_llava_importable() -> None:
    """Import ``llava`` with its real error on failure, then apply the shims (idempotent)."""
    try:
        importlib.import_module("llava.model.language_model.llava_llama")
        importlib.import_module("llava.mm_utils")
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    _hook_nested_models_once()


def _hook_nested_models_once() -> None:
    try:
        from transformers.utils import output_capturing
    except ImportError:  # transformers 4.x: outputs are returned, not captured by hooks
        return
    install = getattr(output_capturing, "install_all_output_capturing_hooks", None)
    if install is None or getattr(install, "_vlsae_once", False):
        return

    @functools.wraps(install)
    def install_once(model, prefix=None):
        if getattr(model, "_output_capturing_hooks_installed", False):
            return
        install(model, prefix)

    install_once._vlsae_once = True
    # Looked up as a module global by the recursive installer, so the patch reaches nested calls.
    output_capturing.install_all_output_capturing_hooks = install_once
