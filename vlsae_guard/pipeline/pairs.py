"""Image-caption pairs: COCO captions, JSONL, or a Hugging Face ``datasets`` dataset.

A source is an indexable list of :class:`Pair` records (id, image reference, caption) built
up front, so collection can resume at any index and split work between ranks. Images are
decoded only when collected (:meth:`PairSource.load_image`); a missing or unreadable image
raises :class:`ImageError`, which the collector counts and skips: one bad file must not end a
run of days. A malformed annotation file, on the other hand, fails at once with the file, the
line or field, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import DirectoryPath, Field, FilePath

from ..scoring.files import DataError, read_records
from ..validation import FrozenSettings


class SourceError(ValueError):
    """An annotation file or dataset that cannot be read as image-caption pairs."""


class ImageError(Exception):
    """One image that cannot be used; ``reason`` is short and stable (``missing``, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Pair:
    """One image-caption pair; ``image`` is a path, or a row index for HF datasets."""

    id: str
    image: str | int
    caption: str

    def record(self, index: int) -> dict[str, Any]:
        """What a store keeps to trace a row back to its image and caption."""
        return {"index": index, "id": self.id, "image": self.image, "caption": self.caption}


class PairSource(Sequence[Pair]):
    """A fixed, ordered list of pairs plus the way to open their images."""

    def __init__(
        self,
        pairs: list[Pair],
        describe: dict[str, Any],
        open_image: Callable[[Pair], Any] | None = None,
        fingerprint_seed: str = "",
    ):
        self.pairs = pairs
        self.describe = describe
        self._open = open_image or _open_path
        self._fingerprint_seed = fingerprint_seed
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]

    def load_image(self, pair: Pair) -> Image.Image:
        """The decoded RGB image, or :class:`ImageError` saying why not."""
        try:
            image = self._open(pair)
        except ImageError:
            raise
        except (FileNotFoundError, IsADirectoryError) as e:
            raise ImageError("missing", str(e)) from e
        except Exception as e:  # noqa: BLE001 - decoders raise anything on corrupt input
            raise ImageError("unreadable", f"{pair.image}: {type(e).__name__}: {e}") from e
        if image is None:
            raise ImageError("missing", f"{pair.image}: no image in the dataset row")
        try:
            return _to_rgb(image)
        except Exception as e:  # noqa: BLE001
            raise ImageError("unreadable", f"{pair.image}: {type(e).__name__}: {e}") from e

    def head(self, n: int) -> PairSource:
        """The first ``n`` pairs (a trial run on part of a dataset)."""
        if n >= len(self.pairs):
            return self
        describe = self.describe | {"limit": n}
        return PairSource(self.pairs[:n], describe, self._open, self._fingerprint_seed)

    def fingerprint(self) -> str:
        """SHA-256 over every pair's id, image reference and caption, in order.

        Image *files* are not hashed (millions of them); paths, ids and captions are.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(self._fingerprint_seed.encode())
            for p in self.pairs:
                digest.update(json.dumps([p.id, p.image, p.caption]).encode())
                digest.update(b"\n")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def _open_path(pair: Pair) -> Image.Image:
    path = Path(pair.image)
    if not path.is_file():
        raise ImageError("missing", str(path))
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file fails here, not in the model
        return img.copy()


def _to_rgb(image: Any) -> Image.Image:
    if isinstance(image, dict):  # datasets' undecoded Image feature: {"bytes", "path"}
        if image.get("bytes"):
            image = Image.open(io.BytesIO(image["bytes"]))
        elif image.get("path"):
            image = _open_path(Pair("", image["path"], ""))
        else:
            raise ImageError("missing", "empty image record")
    elif isinstance(image, str | os.PathLike):
        image = _open_path(Pair("", str(image), ""))
    if not isinstance(image, Image.Image):
        raise ImageError("unreadable", f"expected an image, found {type(image).__name__}")
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


# --- configs ------------------------------------------------------------------------------------


class CocoData(FrozenSettings):
    """COCO captions: ``captions_train2017.json`` and the ``train2017/`` image folder."""

    format: Literal["coco"] = "coco"
    annotations: FilePath
    images: DirectoryPath
    # COCO has ~5 captions per image: "all" makes one pair per caption, "first" one per image.
    captions: Literal["all", "first"] = "all"


class JsonlData(FrozenSettings):
    """One ``{"image": path, "caption": text}`` object per line (``"id"`` optional)."""

    format: Literal["jsonl"] = "jsonl"
    path: FilePath
    # Relative image paths resolve against this folder (default: the JSONL file's folder).
    image_root: DirectoryPath | None = None


class HFData(FrozenSettings):
    """A Hugging Face dataset: a Hub name, or a folder written by ``save_to_disk``."""

    format: Literal["hf"] = "hf"
    dataset: str
    name: str | None = None  # the dataset's configuration name, if it has several
    split: str = "train"
    image_column: str = "image"
    text_column: str = "caption"


DataConfig = Annotated[CocoData | JsonlData | HFData, Field(discriminator="format")]


def open_source(config: CocoData | JsonlData | HFData, dataset: Any = None) -> PairSource:
    """The pairs a data config names; ``dataset`` passes an already loaded HF dataset."""
    if isinstance(config, CocoData):
        return coco_pairs(config.annotations, config.images, captions=config.captions)
    if isinstance(config, JsonlData):
        return jsonl_pairs(config.path, config.image_root)
    return hf_pairs(
        dataset if dataset is not None else load_hf_dataset(config),
        image_column=config.image_column,
        text_column=config.text_column,
        describe=config.model_dump(mode="json"),
    )


# --- COCO ---------------------------------------------------------------------------------------


def coco_pairs(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    captions: Literal["all", "first"] = "all",
) -> PairSource:
    """Pairs from a COCO captions file, in annotation order; ids are ``coco:<annotation id>``."""
    file = Path(annotations)
    raw = _read_json(file)
    if not isinstance(raw, dict) or not {"images", "annotations"} <= raw.keys():
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise SourceError(
            f"{file}: expected a COCO captions file (an object with 'images' and "
            f"'annotations' lists), found {found}"
        )
    root = Path(images)
    files = {}
    for i, entry in enumerate(raw["images"]):
        _require(entry, {"id": int, "file_name": str}, file, f"images[{i}]")
        files[entry["id"]] = str(root / entry["file_name"])
    pairs, seen = [], set()
    for i, ann in enumerate(raw["annotations"]):
        _require(ann, {"image_id": int, "caption": str}, file, f"annotations[{i}]")
        if ann["image_id"] not in files:
            raise SourceError(
                f"{file}: annotations[{i}].image_id {ann['image_id']} is not in 'images'"
            )
        if captions == "first" and ann["image_id"] in seen:
            continue
        seen.add(ann["image_id"])
        ann_id = ann.get("id", i)
        pairs.append(Pair(f"coco:{ann_id}", files[ann["image_id"]], ann["caption"].strip()))
    describe = {"format": "coco", "annotations": str(file), "images": str(root)}
    return PairSource(pairs, describe | {"captions": captions})


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{file}: not readable as JSON ({e})") from e


def _require(obj: Any, fields: dict[str, type], file: Path, where: str) -> None:
    if not isinstance(obj, dict):
        raise SourceError(f"{file}: {where}: expected an object, found {type(obj).__name__}")
    for name, kind in fields.items():
        value = obj.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "nothing" if name not in obj else f"{type(value).__name__} {value!r:.60}"
            raise SourceError(f"{file}: {where}.{name}: expected {kind.__name__}, found {found}")


# --- JSONL --------------------------------------------------------------------------------------


def jsonl_pairs(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> PairSource:
    """Pairs from ``{"image", "caption"[, "id"]}`` lines; ids default to ``line:<n>``."""
    file = Path(path)
    root = Path(image_root) if image_root is not None else file.parent
    try:
        records = list(read_records(file))
    except (OSError, DataError) as e:
        raise SourceError(f"{file}: not readable as JSON lines ({e})") from e
    pairs = []
    for n, obj in records:
        _require(obj, {"image": str, "caption": str}, file, f"line {n}")
        pair_id = str(obj.get("id", f"line:{n}"))
        pairs.append(Pair(pair_id, str(root / obj["image"]), obj["caption"].strip()))
    return PairSource(pairs, {"format": "jsonl", "path": str(file), "image_root": str(root)})


# --- Hugging Face datasets ---------------------------------------------------------------------


def load_hf_dataset(config: HFData) -> Any:
    """``load_from_disk`` for a saved folder, else ``load_dataset`` (Hub name or script)."""
    try:
        import datasets
    except ImportError as e:
        raise SourceError(
            "reading a Hugging Face dataset needs the `datasets` package: pip install datasets"
        ) from e
    local = Path(config.dataset)
    if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if config.split not in ds:
                raise SourceError(f"{local}: no split {config.split!r}, found {sorted(ds)}")
            ds = ds[config.split]
        return ds
    return datasets.load_dataset(config.dataset, config.name, split=config.split)


def hf_pairs(
    dataset: Any,
    image_column: str = "image",
    text_column: str = "caption",
    describe: dict[str, Any] | None = None,
) -> PairSource:
    """Pairs from a ``datasets.Dataset`` (or anything with its row/column interface).

    Needs ``len(ds)``, ``ds[i]`` (a row dict), ``ds[column]`` (a column list) and
    ``column_names``. A text cell holding a list of captions makes one pair per caption.
    Captions are read as one column (no image decoding); images are read row by row.
    """
    columns = list(getattr(dataset, "column_names", []))
    missing = [c for c in (image_column, text_column) if c not in columns]
    if missing:
        raise SourceError(f"dataset has no column(s) {missing}; its columns are {columns}")
    pairs = []
    for row, cell in enumerate(dataset[text_column]):
        texts = cell if isinstance(cell, list | tuple) else [cell]
        for j, text in enumerate(texts):
            if not isinstance(text, str):
                raise SourceError(
                    f"dataset row {row}, column {text_column!r}: expected text, "
                    f"found {type(text).__name__}"
                )
            pair_id = f"hf:{row}" if len(texts) == 1 else f"hf:{row}:{j}"
            pairs.append(Pair(pair_id, row, text.strip()))

    def open_image(pair: Pair) -> Any:
        return dataset[int(pair.image)][image_column]

    seed = str(getattr(dataset, "_fingerprint", "")) + image_column
    info = describe or {"format": "hf", "image_column": image_column, "text_column": text_column}
    return PairSource(pairs, info, open_image=open_image, fingerprint_seed=seed)
