"""CHAIR: object hallucination in image descriptions, scored like the standard ``chair.py``.

Reproduces LisaAnne/Hallucination's ``utils/chair.py`` as LLaVA-era papers run it (Maxlinn's
Python 3 port with its ``chair.pkl`` cache): a caption is lower-cased, tokenized and every
token singularized (:mod:`.text`); adjacent tokens that form a COCO two-word object ("hot dog",
"teddy bear", "wine glass", ...) are merged, "baby"/"adult" + animal and "passenger" + "jet" or
"train" become the animal or vehicle (so no "person" fires), "bow tie" becomes "tie", and "seat"
is dropped when "toilet" is present; the remaining tokens that are COCO object words or their
synonyms (``synonyms.txt``) are the caption's *mentions*, each mapped to its class.

A mention is hallucinated when its class is not in the image's ground truth: the union of the
COCO instance annotations and the objects mentioned in the five reference captions.

- CHAIR_s: captions with at least one hallucinated mention / captions.
- CHAIR_i: hallucinated mentions / all mentions, pooled over captions (repeats count).
- Recall: distinct ground-truth classes mentioned / ground-truth classes, pooled.
- Len: tokens per caption as the standard scorer counts them (``word_tokenize`` tokens,
  punctuation included, two-word objects counted once).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from ..outputs import replacing
from . import stats
from .files import DataError, data_path, format_ids, read_records, require
from .text import singularize, word_tokenize

PROMPT = "Please describe this image in detail."
METRICS = ("CHAIR_s", "CHAIR_i", "Recall", "Len")
# Bump when the word processing changes: ground truth built from annotations is cached by it.
SCORER_VERSION = "chair-standard-1"

DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby X" / "adult X" would otherwise fire "person" (baby, adult are synonyms of person).
ANIMAL_WORDS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
)  # fmt: skip
# "passenger jet" would otherwise fire "person".
VEHICLE_WORDS = ("jet", "train")


@dataclass(frozen=True)
class Vocabulary:
    """Object words, their classes and the two-word rules (the standard scorer's tables)."""

    objects: tuple[str, ...]  # every object word and synonym, in synonyms.txt order
    classes: tuple[str, ...]  # the 80 COCO classes
    word_to_class: Mapping[str, str]
    double_words: Mapping[str, str]

    @classmethod
    def from_synonyms(cls, path: str | os.PathLike | None = None) -> Vocabulary:
        """Built like the standard scorer: each line ``class, synonym, ...`` split on ", "."""
        path = Path(path) if path else data_path("chair", "synonyms.txt")
        rows = [line.strip().split(", ") for line in path.read_text().splitlines() if line.strip()]
        objects = [word for row in rows for word in row]
        word_to_class = {word: row[0] for row in rows for word in row}
        double = {w: w for w in DOUBLE_WORDS}
        for animal in ANIMAL_WORDS:
            double[f"baby {animal}"] = animal
            double[f"adult {animal}"] = animal
        for vehicle in VEHICLE_WORDS:
            double[f"passenger {vehicle}"] = vehicle
        double["bow tie"] = "tie"
        double["toilet seat"] = "toilet"
        double["wine glas"] = "wine glass"  # singularize("glass") == "glas"
        return cls(tuple(objects), tuple(r[0] for r in rows), word_to_class, double)

    def caption_to_words(self, caption: str) -> Words:
        """The caption's object mentions, their classes and its tokens (see module doc)."""
        tokens = [singularize(w) for w in word_tokenize(caption.lower())]
        merged, starts, i = [], [], 0
        while i < len(tokens):
            starts.append(i)
            pair = " ".join(tokens[i : i + 2])
            if pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        words = merged
        if "toilet" in words and "seat" in words:  # "the seat of the toilet" is no chair
            words = [w for w in words if w != "seat"]
        # Positions index the merged list *after* the seat removal, as in the standard scorer.
        hits = [(starts[j], w) for j, w in enumerate(words) if w in self.word_to_class]
        return Words(
            words=[w for _, w in hits],
            classes=[self.word_to_class[w] for _, w in hits],
            positions=[p for p, _ in hits],
            tokens=merged,
        )


@dataclass(frozen=True)
class Words:
    words: list[str]  # object words as written (after singularizing and merging)
    classes: list[str]  # their COCO classes
    positions: list[int]
    tokens: list[str]  # all tokens after merging (Len counts these)


@cache
def vocabulary() -> Vocabulary:
    return Vocabulary.from_synonyms()


# --- ground truth ------------------------------------------------------------------------------


@dataclass
class GroundTruth:
    """COCO classes per image id, with where they came from (recorded in results files)."""

    objects: dict[int, frozenset[str]]
    source: dict = field(default_factory=dict)

    def __getitem__(self, image_id: int) -> frozenset[str]:
        return self.objects[image_id]

    def check(self, image_ids: Iterable[int]) -> None:
        unknown = sorted({i for i in image_ids if i not in self.objects})
        if unknown:
            raise DataError(
                f"{len(unknown)} image ids have no ground truth in {self.source.get('path')} "
                f"(not COCO 2014 images?): {format_ids(unknown)}"
            )


def shipped_ground_truth() -> GroundTruth:
    """The precomputed table for all 123,287 COCO 2014 train+val images (no downloads)."""
    return _read_table(data_path("chair", "coco2014_gt_objects.json.gz"), "shipped")


def _read_table(path: Path, kind: str) -> GroundTruth:
    with gzip.open(path, "rt") as f:
        table = json.load(f)
    objects = {int(k): frozenset(v) for k, v in table.items()}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return GroundTruth(objects, {"kind": kind, "path": str(path), "sha256": digest})


def _write_table(path: Path, objects: Mapping[int, Iterable[str]]) -> None:
    """Deterministic gzip JSON (no timestamp), so the same inputs give the same sha256."""
    payload = json.dumps({str(k): sorted(objects[k]) for k in sorted(objects)}).encode()
    with replacing(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(payload)


ANNOTATION_FILES = ("instances_{}2014.json", "captions_{}2014.json")


def cache_dir() -> Path:
    """``$VLSAE_GUARD_CACHE`` or ``$XDG_CACHE_HOME/vlsae-guard`` (``~/.cache/vlsae-guard``)."""
    if os.environ.get("VLSAE_GUARD_CACHE"):
        return Path(os.environ["VLSAE_GUARD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlsae-guard"


def annotation_ground_truth(
    directory: str | os.PathLike, cache: str | os.PathLike | None = None, progress: bool = True
) -> GroundTruth:
    """Ground truth built from the COCO 2014 annotation files in ``directory``, cached.

    Needs ``instances_val2014.json`` and ``captions_val2014.json``; the train2014 files are used
    too when present (the standard scorer requires both; the val files alone cover the CHAIR
    images). The cache is keyed by the files' names, sizes and modification times and by
    :data:`SCORER_VERSION`, so a changed file or scorer rebuilds it.
    """
    directory = Path(directory)
    files = []
    for split in ("val", "train"):
        found = [directory / name.format(split) for name in ANNOTATION_FILES]
        if all(p.exists() for p in found):
            files += found
        elif split == "val" or any(p.exists() for p in found):
            missing = [p.name for p in found if not p.exists()]
            raise DataError(f"{directory}: missing COCO annotation file(s) {', '.join(missing)}")
    key = hashlib.sha256(SCORER_VERSION.encode())
    for p in files:
        st = p.stat()
        key.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    path = Path(cache or cache_dir()) / "chair" / f"gt-{key.hexdigest()[:20]}.json.gz"
    if not path.exists():
        _write_table(path, _build(files, progress))
    gt = _read_table(path, "annotations")
    gt.source["annotations"] = [str(p) for p in files]
    return gt


def _build(files: Sequence[Path], progress: bool) -> dict[int, set[str]]:
    vocab = vocabulary()
    objects: dict[int, set[str]] = {}
    for path in files:
        if progress:
            print(f"CHAIR ground truth: reading {path}", file=sys.stderr)
        data = json.loads(path.read_text())
        for image in data.get("images", []):
            objects.setdefault(int(image["id"]), set())
        if "categories" in data:
            names = {c["id"]: c["name"] for c in data["categories"]}
            for ann in data["annotations"]:
                name = names[ann["category_id"]]
                objects.setdefault(int(ann["image_id"]), set()).add(vocab.word_to_class[name])
        else:
            for ann in data["annotations"]:
                found = vocab.caption_to_words(ann["caption"]).classes
                objects.setdefault(int(ann["image_id"]), set()).update(found)
    return objects


def ground_truth(annotations: str | os.PathLike | None = None) -> GroundTruth:
    """From the annotation files when given, else the shipped table."""
    return annotation_ground_truth(annotations) if annotations else shipped_ground_truth()


# --- captions and scoring --------------------------------------------------------------------

_COCO_FILE = re.compile(r"(?:^|_)0*(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def image_id(value: int | str, where: str = "") -> int:
    """An image id from an int, a numeric string or a COCO file name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        m = _COCO_FILE.search(os.path.basename(text))
        if m:
            return int(m.group(1))
    raise DataError(f"{where}: cannot read a COCO image id from {value!r}")


def load_captions(
    path: str | os.PathLike, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[tuple[int, str]]:
    """``(image_id, caption)`` per record of a JSON-lines or JSON-array captions file."""
    out = []
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        if caption_key not in rec:
            raise DataError(f"{where}: missing key {caption_key!r} (set --caption-key?)")
        if image_id_key not in rec:
            raise DataError(f"{where}: missing key {image_id_key!r} (set --image-id-key?)")
        out.append((image_id(rec[image_id_key], where), require(rec, caption_key, str, where)))
    if not out:
        raise DataError(f"{path}: no captions")
    return out


def chair500_ids() -> list[int]:
    """The 500 COCO val2014 image ids of the standard CHAIR protocol for LLaVA-1.5."""
    text = data_path("chair", "chair500_image_ids.txt").read_text()
    return [int(line) for line in text.split()]


@dataclass(frozen=True)
class CaptionScore:
    image_id: int
    mentions: list[tuple[str, str]]  # (word, class) in caption order
    hallucinated: list[tuple[str, str]]
    recalled: list[str]  # distinct ground-truth classes mentioned
    gt: list[str]
    n_tokens: int

    def to_json(self) -> dict:
        return {
            "image_id": self.image_id,
            "mentions": self.mentions,
            "hallucinated": self.hallucinated,
            "recalled": self.recalled,
            "ground_truth": self.gt,
            "tokens": self.n_tokens,
        }


def score_caption(image: int, caption: str, gt: GroundTruth) -> CaptionScore:
    words = vocabulary().caption_to_words(caption)
    truth = gt[image]
    mentions = list(zip(words.words, words.classes, strict=True))
    return CaptionScore(
        image_id=image,
        mentions=mentions,
        hallucinated=[(w, c) for w, c in mentions if c not in truth],
        recalled=sorted({c for c in words.classes if c in truth}),
        gt=sorted(truth),
        n_tokens=len(words.tokens),
    )


def score_captions(captions: Sequence[tuple[int, str]], gt: GroundTruth) -> list[CaptionScore]:
    gt.check(i for i, _ in captions)
    return [score_caption(i, c, gt) for i, c in captions]


def ratios(scores: Sequence[CaptionScore]) -> stats.Ratios:
    """CHAIR metrics as per-caption numerators/denominators (pooled like the standard scorer)."""
    one = np.ones(len(scores))

    def col(f) -> np.ndarray:
        return np.array([f(s) for s in scores], dtype=float)

    return {
        "CHAIR_s": (col(lambda s: bool(s.hallucinated)), one, 100.0),
        "CHAIR_i": (col(lambda s: len(s.hallucinated)), col(lambda s: len(s.mentions)), 100.0),
        "Recall": (col(lambda s: len(s.recalled)), col(lambda s: len(s.gt)), 100.0),
        "Len": (col(lambda s: s.n_tokens), one, 1.0),
    }


def metrics(scores: Sequence[CaptionScore]) -> dict[str, float]:
    """CHAIR_s, CHAIR_i, Recall in percent and Len in tokens."""
    if not scores:
        raise ValueError("no captions to score")
    return stats.pooled(ratios(scores))


def compare(
    a: Sequence[CaptionScore],
    b: Sequence[CaptionScore],
    n_boot: int = stats.DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """Both arms' metrics and B - A with paired bootstrap intervals (same images, same order)."""
    ids_a, ids_b = [s.image_id for s in a], [s.image_id for s in b]
    if ids_a != ids_b:
        raise ValueError("the two arms must describe the same images in the same order")
    result = stats.paired_comparison(ratios(a), ratios(b), n_boot, seed)
    result["n"] = len(a)
    return result


def score_file(
    path: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    image_id_key: str = "image_id",
    caption_key: str = "caption",
) -> tuple[dict, list[CaptionScore]]:
    """Score a captions file (``vlsae-guard score chair``): metrics and per-caption details."""
    captions = load_captions(path, image_id_key, caption_key)
    gt = ground_truth(annotations)
    scores = score_captions(captions, gt)
    out: dict = metrics(scores)
    out["n"] = len(scores)
    out["images"] = len({s.image_id for s in scores})
    out["ground_truth"] = gt.source
    out["captions"] = str(path)
    out["scorer"] = SCORER_VERSION
    return out, scores
