"""Collected activations on disk: safetensors shards plus a ``manifest.json``.

Layout::

    STORE/manifest.json              what was collected, how, from what; counts; shard list
    STORE/shards/000000.safetensors  vision (rows, d_v), text (rows, d_t), vision_pair and
                                     text_pair (rows,) int64: the pair index of every row;
                                     metadata "pairs": [{index, id, image, caption}, ...] and
                                     "skipped": [{index, id, reason}, ...]

Shard ``j`` always holds pairs ``[j * P, (j + 1) * P)`` of the source (``P`` =
``pairs_per_shard``), so which pairs a shard holds depends on nothing but its index. A shard is
written to ``*.tmp`` and renamed when complete: after a kill, every ``.safetensors`` file is
whole and a rerun redoes only the missing indices (deleting the leftover ``.tmp``), so nothing
is counted twice. Ranks of a multi-GPU run own disjoint indices. The manifest is rebuilt from the
shard headers by :meth:`StoreWriter.finalize`; until then ``complete`` is false.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..outputs import write_text, write_with
from ..validation import Record, describe_validation_error

log = logging.getLogger(__name__)
FORMAT = "vlsae-guard/activations"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
TENSORS = ("vision", "text", "vision_pair", "text_pair")
MAX_SKIPPED_LISTED = 1000
# Settings that decide what a row means: a rerun into the same store must not change them.
IDENTITY = (
    "model_id",
    "model_sha256",
    "backend",
    "site",
    "layer",
    "pooling",
    "tokens_per_image",
    "prompt",
    "dims",
    "dtype",
    "dataset_fingerprint",
    "pairs",
    "pairs_per_shard",
    "seed",
)


class StoreError(ValueError):
    """A store that cannot be read or resumed; the message names the file and the problem."""


class ShardInfo(Record):
    index: int = Field(ge=0)
    file: str
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    kept: int = Field(ge=0)
    skipped: int = Field(ge=0)
    vision_rows: int = Field(ge=0)
    text_rows: int = Field(ge=0)


class Skipped(Record):
    index: int
    id: str
    reason: str


class Counts(Record):
    pairs: int = 0  # pairs in finished shards (kept + skipped)
    kept: int = 0
    skipped: int = 0
    vision_rows: int = 0
    text_rows: int = 0
    skipped_by_reason: dict[str, int] = Field(default_factory=dict)


class Header(Record):
    """Everything fixed before the first shard: what the rows are and where they come from."""

    format: Literal["vlsae-guard/activations"] = FORMAT
    version: Literal[1] = 1
    model_id: str
    model_sha256: str | None = None
    backend: str
    site: Literal["projector", "layer", "vision_tower"]  # vision_tower: no text rows
    layer: int | None = None  # the decoder layer, or the vision encoder's
    # Site "layer": where in the layer the states were read; collect reads the input. Stores
    # written before it was recorded hold None (they were read at the input too).
    point: Literal["input", "output"] | None = None
    pooling: Literal["token", "mean"]
    tokens_per_image: int | None = None
    prompt: str | None = None
    dims: dict[Literal["vision", "text"], int]
    dtype: str
    dataset: dict[str, Any]
    dataset_fingerprint: str
    pairs: int = Field(ge=0)  # pairs in the source (after --limit)
    pairs_per_shard: int = Field(ge=1)
    seed: int
    settings: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return -(-self.pairs // self.pairs_per_shard)

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.pairs_per_shard
        return start, min(start + self.pairs_per_shard, self.pairs)


class Manifest(Header):
    complete: bool = False
    counts: Counts = Field(default_factory=Counts)
    shards: list[ShardInfo] = Field(default_factory=list)
    skipped: list[Skipped] = Field(default_factory=list)  # the first MAX_SKIPPED_LISTED

    def header(self) -> Header:
        return Header.model_validate(self.model_dump(include=set(Header.model_fields)))


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:06d}.safetensors"


def read_manifest(directory: str | os.PathLike) -> Manifest:
    file = Path(directory) / MANIFEST
    if not file.is_file():
        raise StoreError(f"{file}: missing (not an activation store; run `vlsae-guard collect`)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{file}: not readable as JSON ({e})") from e
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise StoreError(f"{file}: invalid manifest\n{describe_validation_error(e)}") from e


class StoreWriter:
    """Creates or resumes a store; each rank writes the shards it owns."""

    def __init__(self, directory: str | os.PathLike, header: Header):
        self.directory = Path(directory)
        self.header = header

    @classmethod
    def open(cls, directory: str | os.PathLike, header: Header, create: bool = True):
        """Start a store, or resume one collected with the same identity settings.

        ``create=False`` (ranks other than 0) only attaches to the header rank 0 wrote.
        """
        root = Path(directory)
        if (root / MANIFEST).exists():
            existing = read_manifest(root).header()
            diffs = [
                f"  {name}: store has {old!r}, this run {new!r}"
                for name in IDENTITY
                if (old := getattr(existing, name)) != (new := getattr(header, name))
            ]
            if diffs:
                raise StoreError(
                    f"{root / MANIFEST}: this store was collected with other settings, so it "
                    "cannot be resumed; use another output folder\n" + "\n".join(diffs)
                )
        elif not create:
            raise StoreError(f"{root / MANIFEST}: missing (rank 0 writes it first)")
        elif root.exists() and any(root.iterdir()):
            raise StoreError(f"{root}: exists, is not empty and holds no {MANIFEST}")
        else:
            (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            manifest = Manifest(**header.model_dump())
            write_text(root / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        return cls(root, header)

    def path(self, index: int) -> Path:
        return self.directory / shard_name(index)

    def done(self, index: int) -> bool:
        """Shard ``index`` is on disk and readable (an unreadable one is deleted, to redo)."""
        path = self.path(index)
        if not path.is_file():
            return False
        try:
            _shard_info(path, index, self.directory)
        except StoreError as e:
            log.warning("%s; collecting it again", e)
            path.unlink()
            return False
        return True

    def discard_partial(self, indices) -> int:
        """Delete leftover ``.tmp`` files of these shards (a killed run's partial shards)."""
        removed = 0
        for index in indices:
            tmp = self.path(index).with_name(self.path(index).name + ".tmp")
            if tmp.exists():
                tmp.unlink()
                removed += 1
        return removed

    def write(
        self,
        index: int,
        tensors: dict[str, Tensor],
        pairs: list[dict[str, Any]],
        skipped: list[dict[str, Any]],
    ) -> None:
        """Write shard ``index`` atomically: temporary file, fsync, rename."""
        start, stop = self.header.shard_range(index)
        metadata = {
            "format": FORMAT,
            "index": str(index),
            "start": str(start),
            "stop": str(stop),
            "pairs": json.dumps(pairs),
            "skipped": json.dumps(skipped),
        }
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        write_with(self.path(index), lambda tmp: _save_synced(tensors, tmp, metadata))

    def finalize(self) -> Manifest:
        """Rebuild the manifest from the shard files present; complete when none is missing."""
        shards, skipped = [], []
        counts = Counts()
        for index in range(self.header.n_shards):
            if not self.done(index):
                continue
            info, skips = _shard_info(self.path(index), index, self.directory)
            shards.append(info)
            counts.pairs += info.kept + info.skipped
            counts.kept += info.kept
            counts.skipped += info.skipped
            counts.vision_rows += info.vision_rows
            counts.text_rows += info.text_rows
            for s in skips:
                counts.skipped_by_reason[s["reason"]] = (
                    counts.skipped_by_reason.get(s["reason"], 0) + 1
                )
                if len(skipped) < MAX_SKIPPED_LISTED:
                    skipped.append(Skipped(**s))
        manifest = Manifest(
            **self.header.model_dump(),
            complete=len(shards) == self.header.n_shards,
            counts=counts,
            shards=shards,
            skipped=skipped,
        )
        write_text(self.directory / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        return manifest


def _shard_info(path: Path, index: int, root: Path) -> tuple[ShardInfo, list[dict]]:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise StoreError(f"{path}: unreadable shard ({e})") from e
    missing = [name for name in TENSORS if name not in shapes]
    if missing or meta.get("format") != FORMAT:
        raise StoreError(f"{path}: not a shard of this store (missing {missing or 'metadata'})")
    skips = json.loads(meta["skipped"])
    info = ShardInfo(
        index=index,
        file=str(path.relative_to(root)),
        start=int(meta["start"]),
        stop=int(meta["stop"]),
        kept=len(json.loads(meta["pairs"])),
        skipped=len(skips),
        vision_rows=shapes["vision"][0],
        text_rows=shapes["text"][0],
    )
    return info, skips


class ActivationStore:
    """Read side: the manifest, shard tensors, and the source pair of any row."""

    def __init__(self, directory: str | os.PathLike, require_complete: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if require_complete and not self.manifest.complete:
            done, total = len(self.manifest.shards), self.manifest.n_shards
            raise StoreError(
                f"{self.directory / MANIFEST}: collection is not complete ({done} of {total} "
                "shards); rerun the same `vlsae-guard collect` command to finish it"
            )
        for shard in self.manifest.shards:
            if not (self.directory / shard.file).is_file():
                raise StoreError(f"{self.directory / shard.file}: listed in the manifest, missing")

    @property
    def shards(self) -> list[ShardInfo]:
        return self.manifest.shards

    def load(
        self, position: int, names: tuple[str, ...] = TENSORS, device: str | torch.device = "cpu"
    ) -> dict[str, Tensor]:
        """Tensors of the ``position``-th listed shard (only the ones named are read)."""
        path = self.directory / self.shards[position].file
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError) as e:
            raise StoreError(f"{path}: unreadable shard ({e})") from e

    def records(self, position: int) -> list[dict[str, Any]]:
        """``{index, id, image, caption}`` of every kept pair of a shard, in row order."""
        path = self.directory / self.shards[position].file
        with safe_open(path, framework="pt") as f:
            return json.loads((f.metadata() or {})["pairs"])

    def source(self, pair_index: int) -> dict[str, Any]:
        """The pair a row came from (rows carry ``pair_index`` in ``vision_pair``/``text_pair``)."""
        wanted = pair_index // self.manifest.pairs_per_shard
        for position, shard in enumerate(self.shards):
            if shard.index == wanted:
                for record in self.records(position):
                    if record["index"] == pair_index:
                        return record
        raise KeyError(f"pair {pair_index} is not in {self.directory}")


def _save_synced(tensors: dict[str, Tensor], file: Path, metadata: dict[str, str]) -> None:
    """A shard on disk (synced) before it is renamed into place and counted as done."""
    save_file(tensors, file, metadata=metadata)
    with open(file, "rb") as f:
        os.fsync(f.fileno())
