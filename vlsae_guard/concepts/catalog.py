"""Concept catalog: each concept's top images and captions in a store, a label, JSON and HTML.

* Top-N images: pooled vision codes (:mod:`.pooled`) of every *image* in the store (pairs that
  share an image count once, as its first pair), the N highest activations per concept.
* Top-N captions: the same over the pooled text codes of every caption.
* Label: the concept's most characteristic caption words. The captions of its top
  ``label_docs`` images and top ``label_docs`` captions (more than the N shown: with a handful
  of documents, words of the caption templates win by chance) are the concept's documents. A
  word with share ``p`` of those documents and ``q = (1 + df) / (1 + C)`` of the store's ``C``
  captions scores ``p log(p / q)`` (its term of the KL divergence from the store's word
  distribution). Only words clearly more common among the concept's documents than in the
  store can label it: ``c >= n q + 2 sqrt(n q (1 - q))`` for ``c`` of its ``n`` documents
  (two binomial standard deviations), so words of the caption templates ("see", "contains"),
  which every concept's documents hold at about the store's rate, do not. Stopwords are
  removed.

SAEs without a text side (:func:`~.pooled.text_skipped`: vision-encoder SAEs) list no captions:
``caption_count`` is None, the catalog's ``text_skipped`` says why, and labels read the top
images' captions alone. A Matryoshka SAE's concepts carry their ``group`` level.

``write_catalog`` writes ``catalog.json`` (schema: :class:`Catalog`), ``index.html`` (static,
every text escaped) and ``thumbs/`` beside it.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError
from torch import Tensor

from ..core.sae import SparseAutoencoder
from ..outputs import write_text, write_with
from ..pipeline.store import ActivationStore
from ..validation import Record, describe_validation_error
from .pooled import ConceptsError, Pooling, group_levels, iter_pooled, text_skipped

FORMAT = "vlsae-guard/catalog"
THUMB_SIZE = 96
_STOPWORDS = """
    a an the and or but if then else of in on at to from by for with without into onto over
    under above below near next up down out off about around across along behind beside between
    through while during before after is are was were be been being am has have had having do
    does did this that these those there here it its it's they them their he she his her him we
    our you your i me my mine as than so such very too also just not no nor only own same can
    will would should could may might must shall some any each every all both few more most
    other another what which who whom whose when where why how one two three several many much
    lot lots something someone image picture photo photograph view shows showing shown there's
    who's while"""
STOPWORDS = frozenset(_STOPWORDS.split())
# A label word's count among a concept's documents must exceed its expected count by this
# many binomial standard deviations (chance alone rarely gets there).
LIFT_SIGMAS = 2.0
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


class Item(Record):
    """One image or caption of a concept's top list."""

    pair: int
    id: str
    activation: float
    caption: str
    image: str | int | None = None
    thumbnail: str | None = None  # path relative to the HTML page; None when unreadable


def _unset(value: object) -> bool:
    return value is None


class Concept(Record):
    concept: int
    label: str
    words: list[str]
    shared: bool | None  # in the checkpoint's shared set (None: it has none)
    image_count: int  # images on which it fires
    caption_count: int | None  # None: captions not read (an SAE without a text side)
    images: list[Item]
    captions: list[Item]
    # Matryoshka group level (0: the first, most general group); absent for other SAEs.
    group: int | None = Field(default=None, exclude_if=_unset)


class Catalog(Record):
    format: Literal["vlsae-guard/catalog"] = FORMAT
    version: Literal[1] = 1
    sae: str
    store: str
    pooling: Pooling
    top_n: int
    n_concepts: int
    images: int
    captions: int
    concepts: list[Concept]
    # Why captions were not read (the SAE has no text side); absent when they were.
    text_skipped: str | None = Field(default=None, exclude_if=_unset)

    def labels(self) -> dict[int, str]:
        return {c.concept: c.label for c in self.concepts}


def read_catalog(path: str | Path) -> Catalog:
    file = Path(path)
    try:
        return Catalog.model_validate_json(file.read_bytes())
    except OSError as e:
        raise ConceptsError(f"{file}: not readable ({e})") from e
    except ValidationError as e:
        raise ConceptsError(f"{file}: not a concept catalog\n{describe_validation_error(e)}") from e


def words(caption: str) -> list[str]:
    """Lower-case words of a caption, stopwords and one-letter words removed."""
    return [w for w in _WORD.findall(caption.lower()) if len(w) > 1 and w not in STOPWORDS]


def label_words(docs: list[str], df: Counter, n_docs: int, top: int = 3) -> list[str]:
    """The ``top`` most characteristic words of ``docs`` against document frequencies ``df``
    over ``n_docs`` captions: ``p log(p / q)``, for words clearly above their base rate
    (module docstring)."""
    if not docs:
        return []
    present = Counter(w for doc in docs for w in set(words(doc)))
    scores = {}
    n = len(docs)
    for w, c in present.items():
        q = (1 + df.get(w, 0)) / (1 + n_docs)
        if c >= n * q + LIFT_SIGMAS * math.sqrt(n * q * (1 - q)):
            scores[w] = (c / n) * math.log(c / n / q)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:top]]


class TopN:
    """The ``n`` largest (value, item) per concept, kept as flat arrays (no dense K x n)."""

    def __init__(self, n: int):
        self.n = n
        self.concept = torch.empty(0, dtype=torch.long)
        self.value = torch.empty(0)
        self.item = torch.empty(0, dtype=torch.long)

    def update(self, concept: Tensor, value: Tensor, item: Tensor) -> None:
        c = torch.cat([self.concept, concept.long()])
        v = torch.cat([self.value, value.float()])
        i = torch.cat([self.item, item.long()])
        order = torch.argsort(-v, stable=True)  # ties: earlier items first
        order = order[torch.argsort(c[order], stable=True)]
        c, v, i = c[order], v[order], i[order]
        counts = torch.bincount(c)
        starts = counts.cumsum(0) - counts
        keep = torch.arange(len(c)) - starts[c] < self.n
        self.concept, self.value, self.item = c[keep], v[keep], i[keep]

    def update_sparse(self, codes: Tensor, items: Tensor) -> None:
        """From a sparse (B x K) batch whose row ``b`` is item ``items[b]``."""
        codes = codes.coalesce()
        rows, cols = codes.indices()
        vals = codes.values()
        nz = vals > 0
        self.update(cols[nz], vals[nz], items[rows[nz]])

    def groups(self) -> dict[int, list[tuple[int, float]]]:
        out: dict[int, list[tuple[int, float]]] = {}
        for c, v, i in zip(
            self.concept.tolist(), self.value.tolist(), self.item.tolist(), strict=True
        ):
            out.setdefault(c, []).append((i, v))
        return out


def store_records(store: ActivationStore) -> dict[int, dict[str, Any]]:
    """Pair index -> ``{index, id, image, caption}`` over every shard (metadata only)."""
    return {r["index"]: r for p in range(len(store.shards)) for r in store.records(p)}


def first_pairs(records: dict[int, dict[str, Any]]) -> dict[int, Any]:
    """Pair index -> image key for the first pair of each image (pairs may share an image)."""
    seen: dict[Any, int] = {}
    for index in sorted(records):
        seen.setdefault(records[index]["image"], index)
    return {index: image for image, index in seen.items()}


def build_catalog(
    store: ActivationStore,
    sae: SparseAutoencoder,
    *,
    top_n: int = 8,
    pooling: Pooling = "mean",
    concepts: list[int] | None = None,
    label_size: int = 3,
    label_docs: int = 32,
    sae_name: str = "",
) -> Catalog:
    """Top-N images and captions and a label for every concept that fires (or those asked);
    the label reads the top ``max(top_n, label_docs)`` of each."""
    if top_n < 1 or label_docs < 1:
        raise ConceptsError(f"top_n and label_docs must be >= 1, got {top_n}, {label_docs}")
    records = store_records(store)
    firsts = first_pairs(records)
    n = sae.n_concepts
    if concepts is not None:
        bad = [c for c in concepts if not 0 <= c < n]
        if bad:
            raise ConceptsError(f"concepts {bad[:5]} out of range for an SAE with {n} concepts")
    kept = max(top_n, label_docs)
    skipped = text_skipped(sae)
    modalities = ("vision",) if skipped else ("vision", "text")
    top = {m: TopN(kept) for m in modalities}
    fires = {m: torch.zeros(n, dtype=torch.long) for m in modalities}
    for modality in modalities:
        for batch in iter_pooled(store, sae, modality, pooling):
            codes = batch.codes
            if modality == "vision":  # one row per image: drop later pairs of the same image
                mask = torch.tensor([p in firsts for p in batch.pairs.tolist()], dtype=torch.bool)
                codes = codes.index_select(0, mask.nonzero().flatten())
                pairs = batch.pairs[mask]
            else:
                pairs = batch.pairs
            codes = codes.coalesce()
            fires[modality] += torch.bincount(codes.indices()[1], minlength=n)
            top[modality].update_sparse(codes, pairs)
    df = Counter(w for r in records.values() for w in set(words(r["caption"])))
    groups = {m: t.groups() for m, t in top.items()}
    shared = sae.config.shared_concepts
    shared_set = set(shared) if shared is not None else None
    levels = group_levels(sae)
    wanted = concepts
    if wanted is None:
        wanted = sorted(set().union(*groups.values()))
    out = []
    for c in wanted:
        images = [_item(records[p], a) for p, a in groups["vision"].get(c, [])]
        captions = [_item(records[p], a, image=False) for p, a in groups.get("text", {}).get(c, [])]
        docs = [i.caption for i in images[:label_docs]] + [i.caption for i in captions[:label_docs]]
        chosen = label_words(docs, df, len(records), label_size)
        images, captions = images[:top_n], captions[:top_n]
        out.append(
            Concept(
                concept=c,
                label=", ".join(chosen) or "(no label)",
                words=chosen,
                shared=None if shared_set is None else c in shared_set,
                image_count=int(fires["vision"][c]),
                caption_count=None if skipped else int(fires["text"][c]),
                images=images,
                captions=captions,
                group=None if levels is None else int(levels[c]),
            )
        )
    return Catalog(
        sae=sae_name,
        store=str(store.directory),
        pooling=pooling,
        top_n=top_n,
        n_concepts=n,
        images=len(firsts),
        captions=len(records),
        concepts=out,
        text_skipped=skipped,
    )


def _item(record: dict[str, Any], activation: float, image: bool = True) -> Item:
    return Item(
        pair=record["index"],
        id=record["id"],
        activation=activation,
        caption=record["caption"],
        image=record["image"] if image else None,
    )


def write_thumbnails(catalog: Catalog, out: Path, image_root: Path | None = None) -> int:
    """Write one JPEG per distinct image under ``out/thumbs``; returns how many were readable."""
    from PIL import Image, UnidentifiedImageError

    (out / "thumbs").mkdir(parents=True, exist_ok=True)
    done: dict[Any, str | None] = {}
    for concept in catalog.concepts:
        for item in concept.images:
            if item.image not in done:
                done[item.image] = None
                path = _image_path(item.image, image_root)
                if path is not None:
                    name = f"thumbs/{item.pair}.jpg"
                    try:
                        with Image.open(path) as img:
                            img = img.convert("RGB")
                            img.thumbnail((THUMB_SIZE, THUMB_SIZE))
                            write_with(out / name, partial(img.save, quality=85))
                        done[item.image] = name
                    except (OSError, UnidentifiedImageError):
                        pass
            item.thumbnail = done[item.image]
    return sum(v is not None for v in done.values())


def _image_path(image: str | int | None, root: Path | None) -> Path | None:
    if not isinstance(image, str):
        return None  # a Hugging Face dataset row: not a file
    path = Path(image)
    if not path.is_file() and root is not None:
        path = root / image
    return path if path.is_file() else None


def write_catalog(catalog: Catalog, out: Path, image_root: Path | None = None) -> dict[str, Any]:
    """``out/catalog.json``, ``out/index.html`` and ``out/thumbs/``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    thumbs = write_thumbnails(catalog, out, image_root)
    write_text(out / "catalog.json", catalog.model_dump_json(indent=1) + "\n")
    write_text(out / "index.html", render_html(catalog))
    return {"json": out / "catalog.json", "html": out / "index.html", "thumbnails": thumbs}


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fafafa}
h1{font-size:1.4rem} .concept{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:.6rem 1rem;margin:0 0 1rem} .concept h2{font-size:1.05rem;margin:.2rem 0}
.label{color:#0a5} .meta{color:#666;font-size:.85rem;margin:.2rem 0}
.images{display:flex;flex-wrap:wrap;gap:.5rem} figure{margin:0;width:96px;font-size:.75rem}
figure img{display:block;max-width:96px;max-height:96px} .missing{display:block;width:96px;
height:64px;background:#eee;color:#999;text-align:center;line-height:64px}
ol{font-size:.85rem;margin:.4rem 0} .act{color:#888;font-variant-numeric:tabular-nums}
"""


def render_html(catalog: Catalog) -> str:
    """A static page (no script): one section per concept, thumbnails and captions."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>VL-SAE concept catalog</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>VL-SAE concept catalog</h1>",
        f'<p class="meta">SAE {e(catalog.sae)}; store {e(catalog.store)}; '
        f"{catalog.images} images, {catalog.captions} captions; {catalog.pooling} pooling; "
        f"top {catalog.top_n}; {len(catalog.concepts)} of {catalog.n_concepts} concepts</p>",
    ]
    if catalog.text_skipped:
        parts.append(f'<p class="meta">captions not read: {e(catalog.text_skipped)}</p>')
    for c in catalog.concepts:
        shared = {None: "", True: "; shared", False: "; not shared"}[c.shared]
        captions = "" if c.caption_count is None else f", {c.caption_count} captions"
        group = "" if c.group is None else f"; group {c.group}"
        parts.append(f'<section class="concept" id="concept-{c.concept}">')
        parts.append(f'<h2>#{c.concept} <span class="label">{e(c.label)}</span></h2>')
        parts.append(
            f'<p class="meta">fires on {c.image_count} images{captions}{shared}{group}</p>'
        )
        parts.append('<div class="images">')
        for item in c.images:
            title = e(f"{item.caption} ({item.activation:.3f})")
            if item.thumbnail:
                pic = f'<img src="{e(item.thumbnail)}" alt="{e(item.caption)}" title="{title}">'
            else:
                pic = f'<span class="missing" title="{title}">no image</span>'
            parts.append(f"<figure>{pic}<figcaption>{item.activation:.3f}</figcaption></figure>")
        parts.append("</div><ol>")
        for item in c.captions:
            parts.append(
                f'<li><span class="act">{item.activation:.3f}</span> {e(item.caption)}</li>'
            )
        parts.append("</ol></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
