"""The vLLM hook's parts that need no vLLM: which rows to guard, and the SAE as buffers.

vLLM hands ``embed_multimodal`` the pixels of every image scheduled in a step, from several
requests at once, plus our per-image flag. The projector sees them stacked: LLaVA as
``(images, tokens, d)``, LLaVA-NeXT as ``(crops, tokens, d)`` with a variable number of crops
per image, and some code paths flattened to ``(rows, d)``. These helpers map the flags onto
those rows; the math itself is :class:`vlsae_guard.core.intervention.ProjectorIntervention` (and
:class:`vlsae_guard.core.cue_mask.CueMask`). Kept
free of vLLM so that they are tested in the fast suite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class ProjectorLayoutError(ValueError):
    """The projector output cannot be matched to the images that produced it."""


def image_flags(value: object, n_images: int | None) -> Tensor | None:
    """Per-image bools from the batched request field (a tensor, or a list of scalars).

    ``None`` (no field) gives ``None``: the caller applies the server's default to all.
    """
    return _per_image(value, n_images, torch.bool, "guard flags")


def image_values(value: object, n_images: int | None) -> Tensor | None:
    """Per-image integers from a batched request field (cue masking's asked object index)."""
    return _per_image(value, n_images, torch.long, "values")


def _per_image(value: object, n_images: int | None, dtype: torch.dtype, what: str):
    if value is None:
        return None
    if torch.is_tensor(value):
        out = value.reshape(-1).to("cpu", dtype)
    elif isinstance(value, list | tuple):
        out = torch.tensor([torch.as_tensor(v).item() for v in value]).to(dtype)
    else:
        raise ProjectorLayoutError(f"expected per-image {what}, found {type(value).__name__}")
    if n_images is not None and out.numel() != n_images:
        raise ProjectorLayoutError(f"{out.numel()} {what} for {n_images} images in this batch")
    return out


def mask_cues(
    cue_mask: Callable, output: Tensor, flags: Tensor | None, crops, asked: Tensor | None
) -> Tensor | None:
    """Cue masking over a vLLM batch: each guarded image's asked object (index, -1: none) is
    passed with its rows; None when nothing is masked (a dummy batch, the switch off, no object
    asked, no cue in the image)."""
    if flags is None or asked is None:
        return None
    picks = [int(a) if bool(f) and int(a) >= 0 else None for f, a in zip(flags, asked, strict=True)]
    if all(p is None for p in picks):
        return None
    if crops is None:
        raise ProjectorLayoutError(
            "cue masking needs each image's projector rows, but this batch's pixel_values "
            "layout does not say them"
        )
    token_mask(flags, crops, output.shape)  # checks that the rows add up
    rows = output if output.dim() == 3 else output.reshape(sum(crops), -1, output.shape[-1])
    new = cue_mask(rows, torch.as_tensor(list(crops)), picks)
    return None if new is None else new.reshape(output.shape)


def crops_per_image(pixel_values: object) -> list[int] | None:
    """Projector rows each image contributes: 1 for LLaVA, its anyres crops for LLaVA-NeXT.

    Accepts vLLM's batched layouts: a tensor ``(images, 3, h, w)`` or ``(images, crops, 3, h,
    w)``, or a list of per-image tensors ``(3, h, w)`` / ``(crops, 3, h, w)``. ``None`` when
    the layout is not one of these.
    """
    if torch.is_tensor(pixel_values):
        if pixel_values.dim() == 4:
            return [1] * pixel_values.shape[0]
        if pixel_values.dim() == 5:
            return [pixel_values.shape[1]] * pixel_values.shape[0]
        return None
    if isinstance(pixel_values, list | tuple) and all(torch.is_tensor(p) for p in pixel_values):
        if all(p.dim() == 3 for p in pixel_values):
            return [1] * len(pixel_values)
        if all(p.dim() == 4 for p in pixel_values):
            return [p.shape[0] for p in pixel_values]
    return None


def token_mask(flags: Tensor, crops: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Bool per row of ``output.reshape(-1, d)``: does it come from a guarded image?"""
    per_crop = flags.repeat_interleave(torch.as_tensor(list(crops), dtype=torch.long))
    n_crops = per_crop.numel()
    if len(shape) == 3:
        if shape[0] != n_crops:
            raise ProjectorLayoutError(
                f"the projector produced {shape[0]} rows of image tokens, but the batch's "
                f"{len(crops)} images account for {n_crops}"
            )
        tokens = shape[1]
    elif len(shape) == 2:
        if n_crops == 0 or shape[0] % n_crops:
            raise ProjectorLayoutError(
                f"the projector produced {shape[0]} flattened image tokens, not a multiple of "
                f"the {n_crops} crops of the batch's {len(crops)} images"
            )
        tokens = shape[0] // n_crops
    else:
        raise ProjectorLayoutError(
            f"expected projector outputs (rows, tokens, d) or (tokens, d), found shape "
            f"{tuple(shape)}"
        )
    return per_crop.repeat_interleave(tokens)


def guard_rows(guard: Callable[[Tensor], Tensor], output: Tensor, mask: Tensor) -> Tensor | None:
    """``output`` with ``guard`` applied to the rows ``mask`` selects; None if it selects none.

    All rows (the common case: one setting for the whole step) go through ``guard`` in one
    call without copying; a mixed batch guards only its selected rows.
    """
    if not bool(mask.any()):
        return None
    if bool(mask.all()):
        return guard(output)
    flat = output.reshape(-1, output.shape[-1])
    rows = mask.to(flat.device)
    out = flat.clone()
    out[rows] = guard(flat[rows])
    return out.reshape(output.shape)


def freeze_into_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter into a non-persistent buffer of the same name (in place).

    vLLM's loader requires every parameter of the model to come from the checkpoint; buffers
    that are not persistent are neither loaded nor expected.
    """
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            del sub._parameters[name]
            sub.register_buffer(name, param.detach(), persistent=False)
    return module
