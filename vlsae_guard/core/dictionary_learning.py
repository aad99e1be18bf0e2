"""Import SAEs trained with ``dictionary_learning`` (github.com/saprmarks/dictionary_learning).

Its ``ae.pt`` files are ``torch.save(ae.state_dict())`` of a ``BatchTopKSAE`` or a
``MatryoshkaBatchTopKSAE``, the classes Pach et al. (2025, ExplainableML/sae-for-vlm) train on
CLIP's vision encoder; they become our ``batchtopk`` and ``matryoshka`` architectures. The class
is told from the state dict's keys alone: the ``config.json`` beside ``ae.pt`` may be missing or
belong to another run. Everything is checked before anything is written: the key set, one D and
one F across all tensors, finite floating-point weights, a scalar threshold, an integer ``k`` in
[1, F], group sizes positive and summing to F.

Deviations from dictionary_learning, none in the math:

* ``k`` and ``group_sizes`` are integer buffers there, config fields here (``k``, ``groups``);
  every tensor is stored in float32 (a float32 ``threshold`` is kept bit for bit).
* Decoder directions are rows here (F x D): BatchTopK's ``nn.Linear`` decoder weight (D x F) is
  transposed, Matryoshka's ``W_dec`` is not; its ``W_enc`` (D x F) is transposed into
  ``encoder.weight``; ``b_dec`` becomes ``decoder.bias``.
* ``config.json`` contributes the model name only (``trainer.lm_name`` as ``source.model_id``,
  when none is given and its ``dict_class`` is the detected class). Its ``layer`` indexes whatever
  submodule the training script hooked, which does not say where in LLaVA: the site is recorded
  from the caller only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ..outputs import refuse_non_empty
from .checkpoint import (
    CheckpointError,
    check_state,
    convert_layout,
    detect_layout,
    imported_config,
    load_checked,
    matrix_shape,
    read_torch_state,
    save,
)
from .sae import SparseAutoencoder, build

# dictionary_learning key -> (our key, transpose), per class.
_LAYOUTS: dict[str, dict[str, tuple[str, bool]]] = {
    # nn.Linear encoder (F x D); decoder nn.Linear(F -> D, bias=False): weight D x F.
    "BatchTopKSAE": {
        "encoder.weight": ("encoder.weight", False),
        "encoder.bias": ("encoder.bias", False),
        "decoder.weight": ("decoder.weight", True),
        "b_dec": ("decoder.bias", False),
        "threshold": ("threshold", False),
    },
    # Bare parameters: (x - b_dec) @ W_enc (D x F) + b_enc, f @ W_dec (F x D) + b_dec.
    "MatryoshkaBatchTopKSAE": {
        "W_enc": ("encoder.weight", True),
        "b_enc": ("encoder.bias", False),
        "W_dec": ("decoder.weight", False),
        "b_dec": ("decoder.bias", False),
        "threshold": ("threshold", False),
    },
}
# The integer buffers, read exactly into the config instead of loaded as tensors.
_INTEGERS = {"BatchTopKSAE": ("k",), "MatryoshkaBatchTopKSAE": ("k", "group_sizes")}
ARCHITECTURES = {"BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka"}
TRAINER_CONFIG = "config.json"


def import_dictionary_learning(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    source: dict | None = None,
    overwrite: bool = False,
) -> SparseAutoencoder:
    """Convert a dictionary_learning ``ae.pt`` into a validated checkpoint directory.

    A non-empty ``out_dir`` is refused unless ``overwrite``; the directory holding ``ckpt``
    always is, since our ``config.json`` would replace the trainer's.
    """
    ckpt = Path(ckpt)
    if Path(out_dir).resolve() == ckpt.parent.resolve():
        raise CheckpointError(
            f"{out_dir}: holds {ckpt.name}; writing the checkpoint there would replace "
            f"dictionary_learning's {TRAINER_CONFIG}: choose another directory"
        )
    refuse_non_empty(out_dir, overwrite)
    state = read_torch_state(ckpt)
    cls = detect_layout(state, {c: [*_LAYOUTS[c], *_INTEGERS[c]] for c in _LAYOUTS}, ckpt)
    layout = _LAYOUTS[cls]
    encoder, transposed = next(
        (old, t) for old, (new, t) in layout.items() if new == "encoder.weight"
    )
    n_concepts, d_in = matrix_shape(state, encoder, ckpt)[:: -1 if transposed else 1]
    k, groups = _integers(state, cls, n_concepts, ckpt)
    if not (source or {}).get("model_id") and (model_id := _trained_on(ckpt, cls)):
        source = {**(source or {}), "model_id": model_id}
    config = imported_config(
        ckpt,
        architecture=ARCHITECTURES[cls],
        d_in=d_in,
        n_concepts=n_concepts,
        k=k,
        groups=groups,
        **({"source": source} if source else {}),
    )
    sae = build(config)
    # Their names and shapes first, so an error names the tensor as the file does.
    ours = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    expected = {old: ours[new][::-1] if t else ours[new] for old, (new, t) in layout.items()}
    weights = {old: state[old] for old in layout}
    check_state(
        weights,
        expected,
        ckpt,
        problem=f"inconsistent {cls} (D={d_in}, F={n_concepts}, read from {encoder})",
    )
    converted = {name: t.float() for name, t in convert_layout(weights, layout).items()}
    load_checked(sae, ckpt, tensors=converted)
    save(sae, out_dir)
    return sae.eval()


def _integers(
    state: dict[str, Tensor], cls: str, n_concepts: int, file: Path
) -> tuple[int, list[int] | None]:
    """``k`` (and Matryoshka's group sizes), exactly; ranges checked against F."""
    (k,) = _integer_values(state["k"], "k", 0, file)
    if not 1 <= k <= n_concepts:
        raise CheckpointError(
            f"{file}: tensor k: expected 1 <= k <= F (n_concepts, {n_concepts}), found {k}"
        )
    if "group_sizes" not in _INTEGERS[cls]:
        return k, None
    sizes = _integer_values(state["group_sizes"], "group_sizes", 1, file)
    if not sizes or min(sizes) < 1 or sum(sizes) != n_concepts:
        raise CheckpointError(
            f"{file}: tensor group_sizes: expected positive sizes summing to F (n_concepts, "
            f"{n_concepts}), found {sizes} (sum {sum(sizes)})"
        )
    return k, sizes


def _integer_values(tensor: Tensor, name: str, ndim: int, file: Path) -> list[int]:
    """The values of an integer tensor of rank ``ndim``; a float (even 8.0) or bool is refused."""
    if (
        tensor.dim() != ndim
        or tensor.is_floating_point()
        or tensor.is_complex()
        or tensor.dtype == torch.bool
    ):
        raise CheckpointError(
            f"{file}: tensor {name}: expected a {ndim}-d integer tensor, found "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor.reshape(-1).tolist()


def _trained_on(ckpt: Path, cls: str) -> str | None:
    """``trainer.lm_name`` of the ``config.json`` dictionary_learning writes beside ``ae.pt``,
    when it describes ``cls``; informational, so a missing or unreadable file is ignored."""
    try:
        trainer = json.loads((ckpt.parent / TRAINER_CONFIG).read_text())["trainer"]
        same_class = trainer.get("dict_class", cls) == cls
        name = trainer["lm_name"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return name if same_class and isinstance(name, str) and name else None
