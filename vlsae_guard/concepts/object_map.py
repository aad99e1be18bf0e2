"""Build an object map (``objects.json``) for cue masking from images labelled with their objects.

:func:`build_object_map` (and the lab, through :func:`fit_from_images`): the model projects each
image, the projector SAE encodes its tokens, and
:func:`~vlsae_guard.core.object_evidence.fit_object_concepts` fits each object's concepts and the
captions' co-occurrence statistics. The labels should be those of the data the model learned its
prior from (COCO's object annotations for LLaVA; the lab's training captions): the cues are read
off their co-occurrences.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from pydantic import Field

from .. import outputs
from ..backends import detect, load
from ..core.checkpoint import check_compatible
from ..core.checkpoint import load as load_sae
from ..core.object_evidence import ObjectConcepts, fit_object_concepts, pooled_codes
from ..pipeline.collect import SiteReader
from ..validation import FrozenSettings


class ObjectMapConfig(FrozenSettings):
    model: str
    sae: str  # a projector VL-SAE checkpoint directory
    labels: Path  # JSON lines: {"image": path relative to images, "objects": [names]}
    images: Path
    out: Path | None = None  # None: SAE/objects.json
    top: int = Field(default=8, ge=1)
    calibrate: float = Field(default=1 / 3, gt=0, lt=1)
    batch_size: int = Field(default=64, ge=1)
    device: str = "cpu"


@dataclass(frozen=True)
class Labelled:
    image: Image.Image | Path  # a path is opened when its batch is projected
    objects: frozenset[str]


def read_labels(labels: Path, images: Path) -> list[Labelled]:
    """The labelled images of a JSON-lines file (paths: each image is opened only when its
    batch is projected, so a large set is not held in memory); every problem names the file
    and line."""
    out = []
    try:
        lines = labels.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{labels}: cannot read the labels ({e.strerror})") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, objects = row["image"], row["objects"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f'{labels}:{number}: expected {{"image": ..., "objects": [...]}}, found '
                f"{line[:80]!r}"
            ) from e
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise ValueError(f"{labels}:{number}: objects must be a list of names")
        if not (images / image).is_file():
            raise ValueError(f"{labels}:{number}: no image file {images / image}")
        out.append(Labelled(images / image, frozenset(o.strip().lower() for o in objects)))
    if len(out) < 3:
        raise ValueError(f"{labels}: {len(out)} labelled images; an object map needs more")
    return out


@torch.inference_mode()
def pooled_image_codes(
    reader: SiteReader, sae, images: list[Image.Image | Path], batch_size: int
) -> torch.Tensor:
    """Each image's concept activations at the projector, pooled over its tokens (as cue
    masking pools them)."""
    rows = []
    for start in range(0, len(images), batch_size):
        batch = [_opened(image) for image in images[start : start + batch_size]]
        vision = [v for v, _ in reader(batch, [""] * len(batch), list(range(len(batch))))]
        codes = sae.encode_topk(torch.cat(vision).to(sae.dtype), "vision")
        sizes = torch.tensor([len(v) for v in vision])
        owners = torch.repeat_interleave(torch.arange(len(vision)), sizes)
        rows.append(pooled_codes(codes, owners, len(vision)))
    return torch.cat(rows)


def _opened(image: Image.Image | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot open image {image}: {e}") from e


def fit_from_images(
    reader: SiteReader,
    sae,
    items: list[Labelled],
    top: int = 8,
    calibrate: float = 1 / 3,
    batch_size: int = 64,
    fitted_on: dict | None = None,
) -> ObjectConcepts:
    names = sorted(set().union(*(i.objects for i in items)))
    pooled = pooled_image_codes(reader, sae, [i.image for i in items], batch_size)
    labels = torch.tensor([[n in i.objects for n in names] for i in items])
    return fit_object_concepts(pooled, labels, names, top, calibrate, fitted_on)


def build_object_map(config: ObjectMapConfig) -> Path:
    """Fit and write the object map; returns where it was written. The output's folder is
    checked writable, and the labels read, before any model is loaded."""
    out = config.out or Path(config.sae) / "objects.json"
    outputs.check_writable(out.parent, "--out" if config.out else "--sae")
    items = read_labels(config.labels, config.images)
    sae = load_sae(config.sae).eval().to(config.device)
    model, inputs = load(config.model, device=config.device)
    width = detect(model).out_features()
    check_compatible(sae.config, "projector", "cue masking", width, f"{config.model}'s projector")
    reader = SiteReader(model, inputs, layer=None)
    provenance = {"labels": str(config.labels), "model": config.model, "sae": config.sae}
    objects = fit_from_images(
        reader, sae, items, config.top, config.calibrate, config.batch_size, provenance
    )
    return objects.save(out)
