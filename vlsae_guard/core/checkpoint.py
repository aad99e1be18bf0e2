"""Checkpoints: ``config.json`` + ``model.safetensors`` (+ ``aux.safetensors``), loaded safely.

Everything is validated before a module is returned: config fields, tensor names and shapes,
finiteness. Pickle files are never unpickled except by the importers (:func:`import_official`,
:mod:`.dictionary_learning`), which use ``torch.load(weights_only=True)`` (tensors only, no code).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..outputs import refuse_non_empty, write_text, write_with
from ..validation import describe_validation_error
from .sae import PERSISTENCE, SparseAutoencoder, build
from .sae_config import AuxConfig, SAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
AUX_WEIGHTS_NAME = "aux.safetensors"
# Magic numbers of what people pass by mistake: a raw pickle (PROTO opcode, protocol 2-5) and
# torch.save's zip archive. Only a hint for error messages: a safetensors file starts with its
# header length, whose bytes can be anything, so it is always parsed as safetensors first.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


def save(sae: SparseAutoencoder, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and the safetensors files; returns the directory."""
    out = Path(directory)
    state = {k: v for k, v in sae.state_dict().items() if not k.startswith("aux.")}
    write_with(out / WEIGHTS_NAME, lambda tmp: save_file(_contiguous(state), tmp))
    if sae.aux is not None:
        aux = _contiguous(sae.aux.state_dict())
        write_with(out / AUX_WEIGHTS_NAME, lambda tmp: save_file(aux, tmp))
    write_text(out / CONFIG_NAME, sae.config.model_dump_json(indent=2) + "\n")
    return out


def load(
    path_or_hub_id: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> SparseAutoencoder:
    """Load a checkpoint directory (or Hub repo id) into the architecture its config names."""
    directory = resolve(path_or_hub_id, revision=revision)
    config = read_config(directory / CONFIG_NAME)
    sae = build(config)
    load_checked(sae, directory / WEIGHTS_NAME, skip_prefix="aux.")
    if config.aux is not None:
        load_checked(sae.aux, directory / AUX_WEIGHTS_NAME)
    elif (directory / AUX_WEIGHTS_NAME).exists():
        # Ignoring it would silently feed raw features to an SAE trained on projected ones.
        raise CheckpointError(
            f"{directory / AUX_WEIGHTS_NAME}: present, but {directory / CONFIG_NAME} has no "
            "aux section describing it"
        )
    return sae.to(device=device, dtype=dtype).eval()


PERSISTENCE.update(load=load, save=save)  # SparseAutoencoder.from_pretrained / save_pretrained


def resolve(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hub repo id through ``huggingface_hub``."""
    path = Path(path_or_hub_id)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: expected a checkpoint directory holding {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}, found a file"
                + (
                    " (a pickle/torch.save file: convert it with `vlsae-guard import-official` "
                    "or `vlsae-guard import-sae`)"
                    if _looks_pickled(path)
                    else ""
                )
            )
        return path
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{name}: no such directory, and not a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors"],
                local_files_only=_hub_offline(),
            )
        )
    except HFValidationError as e:
        raise CheckpointError(
            f"{name}: no such directory, and not a valid Hub repo id ({e})"
        ) from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{name}: not a local directory and the Hugging Face Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1) and it is not in the local cache; download it on a "
            "machine with access and pass the directory"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{name}: Hub download failed: {e}") from e


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now: huggingface_hub reads it once, at import time."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return constants.HF_HUB_OFFLINE or env in {"1", "ON", "YES", "TRUE"}


def read_config(file: Path) -> SAEConfig:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (a checkpoint needs {CONFIG_NAME})")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    try:
        return SAEConfig.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError(f"{file}: invalid config\n{describe_validation_error(e)}") from e


def _shapes(module: torch.nn.Module, skip_prefix: str | None = None) -> dict[str, tuple]:
    return {
        k: tuple(v.shape)
        for k, v in module.state_dict().items()
        if skip_prefix is None or not k.startswith(skip_prefix)
    }


def load_checked(
    module: torch.nn.Module, file: Path, skip_prefix: str | None = None, tensors=None
) -> None:
    """Validate ``tensors`` (read from ``file`` unless given) against ``module``, then load."""
    tensors = read_tensors(file) if tensors is None else tensors
    check_state(tensors, _shapes(module, skip_prefix), file)
    module.load_state_dict(tensors, strict=skip_prefix is None)


def read_tensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(file)  # parses a header, never runs code, whatever the file holds
    except (SafetensorError, OSError, ValueError) as e:
        if _looks_pickled(file):
            raise CheckpointError(
                f"{file}: is a pickle/torch.save file, expected safetensors; convert official "
                "checkpoints with `vlsae-guard import-official`"
            ) from e
        raise CheckpointError(f"{file}: unreadable or truncated safetensors file ({e})") from e


def check_state(
    tensors: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    file: Path | str,
    problem: str = "weights do not match the config",
) -> None:
    """Same names, same shapes, finite values; the error lists every mismatch at once."""
    problems = []
    for name in sorted(expected.keys() - tensors.keys()):
        problems.append(f"  missing tensor {name} (expected shape {expected[name]})")
    for name in sorted(tensors.keys() - expected.keys()):
        problems.append(f"  unexpected tensor {name} {tuple(tensors[name].shape)}")
    for name in sorted(expected.keys() & tensors.keys()):
        t = tensors[name]
        if tuple(t.shape) != expected[name]:
            problems.append(
                f"  tensor {name}: expected shape {expected[name]}, found {tuple(t.shape)}"
            )
        elif not t.is_floating_point():
            problems.append(f"  tensor {name}: expected a floating-point dtype, found {t.dtype}")
        elif not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            problems.append(f"  tensor {name}: {bad} NaN/inf values")
    if problems:
        raise CheckpointError(f"{file}: {problem}\n" + "\n".join(problems))


def check_module(module: torch.nn.Module, where: str) -> None:
    """The checks a load applies (floating point, finite), for weights built in memory."""
    check_state(module.state_dict(), _shapes(module), where)


def check_compatible(
    config: SAEConfig,
    site: str,
    needed_by: str,
    projector_width: int | None = None,
    projector: str = "the projector",
) -> None:
    """Refuse an SAE trained at another ``site`` than ``needed_by`` (a mode, a server) needs,
    or, given ``projector_width``, one over another projector's outputs (:class:`ValueError`).

    ``guard()``, the vLLM plugin and ``serve`` (before it starts, from ``config.json`` alone)
    all check through here, so they refuse the same SAEs with the same words; an SAE that does
    not record its site passes the site check.
    """
    source, d_in = config.source, config.d_in
    if source.site is not None and source.site != site:
        raise ValueError(
            f"{needed_by} needs an SAE trained at site {site!r}; this one was trained at site "
            f"{source.site!r}" + (f" (layer {source.layer})" if source.layer is not None else "")
        )
    if projector_width is not None and projector_width != d_in:
        raise ValueError(
            f"{projector} outputs width {projector_width}, but the SAE expects d_in={d_in}: this "
            "SAE was trained for another model"
        )


def _looks_pickled(file: Path) -> bool:
    with open(file, "rb") as f:
        head = f.read(4)
    return head.startswith(_PICKLE_MAGIC)


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# --- the checkpoints released with the VL-SAE paper -------------------------------------------

# Official key -> (our key, transpose); the first key of each is an encoder weight (n x d).
# Decoders are nn.Linear(n -> d) there: weight (d, n); ours (n, d).
_OFFICIAL_LAYOUTS: dict[str, dict[str, tuple[str, bool]]] = {
    "vl-sae": {
        "encoder": ("encoder", False),
        "vision_decoder.weight": ("vision_decoder.weight", True),
        "vision_decoder.bias": ("vision_decoder.bias", False),
        "text_decoder.weight": ("text_decoder.weight", True),
        "text_decoder.bias": ("text_decoder.bias", False),
    },
    "sae-v": {
        "encoder.weight": ("encoder.weight", False),
        "encoder.bias": ("encoder.bias", False),
        "decoder.0.weight": ("decoder.weight", True),
        "decoder.0.bias": ("decoder.bias", False),
    },
    "sae-d": {
        "v_encoder.weight": ("vision_encoder.weight", False),
        "v_encoder.bias": ("vision_encoder.bias", False),
        "t_encoder.weight": ("text_encoder.weight", False),
        "t_encoder.bias": ("text_encoder.bias", False),
        "vision_decoder.0.weight": ("vision_decoder.weight", True),
        "vision_decoder.0.bias": ("vision_decoder.bias", False),
        "text_decoder.0.weight": ("text_decoder.weight", True),
        "text_decoder.0.bias": ("text_decoder.bias", False),
    },
}
# The official training script's --topk default.
OFFICIAL_TOPK = 256
_AUX_KEYS = [
    f"{part}.{p}"
    for part in ("vision_projection", "text_projection", "vision_decoder", "text_decoder")
    for p in ("weight", "bias")
]


def import_official(
    sae_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    aux_file: str | os.PathLike | None = None,
    k: int = OFFICIAL_TOPK,
    source: dict | None = None,
    overwrite: bool = False,
) -> SparseAutoencoder:
    """Convert the paper's ``.pth`` (+ auxiliary ``.pt``) into a validated checkpoint directory.

    A non-empty ``out_dir`` is refused unless ``overwrite``: it may hold another checkpoint.
    """
    refuse_non_empty(out_dir, overwrite)
    sae_file = Path(sae_file)
    state = _torch_load(sae_file)
    architecture = detect_layout(state, _OFFICIAL_LAYOUTS, sae_file)
    layout = _OFFICIAL_LAYOUTS[architecture]
    n_concepts, d_in = matrix_shape(state, next(iter(layout)), sae_file)  # an encoder weight
    ours = convert_layout(state, layout)

    aux_state, aux_config = None, None
    if aux_file is not None:
        aux_file = Path(aux_file)
        aux_state = _torch_load(aux_file)
        if set(aux_state) != set(_AUX_KEYS):
            raise CheckpointError(
                f"{aux_file}: expected auxiliary AE keys {_AUX_KEYS}, found {sorted(aux_state)}"
            )
        d_proj, d_vision = matrix_shape(aux_state, "vision_projection.weight", aux_file)
        d_text = matrix_shape(aux_state, "text_projection.weight", aux_file)[1]
        aux_config = AuxConfig(d_vision=d_vision, d_text=d_text, d_proj=d_proj)
    config = imported_config(
        sae_file,
        architecture=architecture,
        d_in=d_in,
        n_concepts=n_concepts,
        k=k,
        aux=aux_config,
        **({"source": source} if source else {}),
    )
    sae = build(config)
    load_checked(sae, sae_file, skip_prefix="aux.", tensors=ours)
    if sae.aux is not None:
        load_checked(sae.aux, aux_file, tensors=aux_state)
    save(sae, out_dir)
    return sae.eval()


# --- shared by the importers (this module's and .dictionary_learning's) ------------------------


def detect_layout(
    state: Mapping[str, Tensor], layouts: Mapping[str, Iterable[str]], file: Path
) -> str:
    """The layout whose key set is exactly the state dict's; the error lists them all."""
    found = next((name for name, keys in layouts.items() if set(keys) == set(state)), None)
    if found is None:
        known = "; ".join(f"{name}: {sorted(keys)}" for name, keys in layouts.items())
        raise CheckpointError(
            f"{file}: unknown state-dict layout, found keys {sorted(state)}; expected one of "
            f"{known}"
        )
    return found


def convert_layout(
    state: Mapping[str, Tensor], layout: Mapping[str, tuple[str, bool]]
) -> dict[str, Tensor]:
    """Rename (and transpose where the layout says) the tensors of ``layout`` into ours."""
    return {
        new: state[old].T if transpose else state[old] for old, (new, transpose) in layout.items()
    }


def imported_config(file: Path, **fields) -> SAEConfig:
    """The config of an imported checkpoint; invalid fields are a :class:`CheckpointError`."""
    try:
        return SAEConfig(**fields)
    except ValidationError as e:
        raise CheckpointError(
            f"{file}: cannot build a config\n{describe_validation_error(e)}"
        ) from e


def matrix_shape(state: Mapping[str, Tensor], key: str, file: Path) -> tuple[int, int]:
    """The shape of a weight the config is inferred from; anything but a matrix is refused."""
    shape = tuple(state[key].shape)
    if len(shape) != 2 or 0 in shape:
        raise CheckpointError(f"{file}: tensor {key} should be a non-empty matrix, found {shape}")
    return shape


def _torch_load(file: Path) -> dict[str, Tensor]:
    """:func:`read_torch_state` in float32: the paper's files hold weights only."""
    return {k: v.float() for k, v in read_torch_state(file).items()}


def read_torch_state(file: Path) -> dict[str, Tensor]:
    """A state dict of tensors, read tensors-only, as saved (dtypes kept); unwrapped from a
    ``state_dict`` key and from DataParallel's ``module.`` prefixes."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        raise CheckpointError(
            f"{file}: cannot be read as a tensors-only torch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{file}: expected a state dict of tensors, found {type(obj).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}
