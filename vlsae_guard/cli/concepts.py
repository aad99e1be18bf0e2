"""Concept commands: ``inspect`` one input, ``catalog`` and ``ms`` over a collected store,
``object-map`` (cue masking's object concepts) over labelled images.

Their arguments are validated by the models below, whose defaults are also argparse's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import DirectoryPath, Field, FilePath, model_validator

from ..concepts.object_map import ObjectMapConfig
from ..concepts.pooled import Pooling
from ..core.checkpoint import load
from ..outputs import OutputError, check_writable, refuse_non_empty
from ..validation import Settings
from .app import (
    UsageError,
    arg,
    field_arg,
    field_choices,
    rewrite_args,
    rewrite_flag,
    subcommand,
    validated_flags,
    write_json,
)

if TYPE_CHECKING:
    from ..core.sae import SparseAutoencoder
    from ..pipeline.store import ActivationStore


class _ConceptArgs(Settings):
    pooling: Pooling = "mean"  # an image's activation of a concept over its tokens


class InspectArgs(_ConceptArgs):
    image: FilePath | None = None
    text: str | None = None
    top: int = Field(default=10, ge=1)
    catalog: FilePath | None = None
    device: str = "cpu"

    @model_validator(mode="after")
    def _something_to_inspect(self) -> InspectArgs:
        if self.image is None and self.text is None:
            raise ValueError("give --image FILE, --text TEXT or both")
        return self


class _StoreArgs(_ConceptArgs):
    store: DirectoryPath
    out: Path


class CatalogArgs(_StoreArgs):
    top_n: int = Field(default=8, ge=1)
    concepts: list[int] | None = None  # all of them
    label_words: int = Field(default=3, ge=1)
    label_docs: int = Field(default=32, ge=1)
    image_root: DirectoryPath | None = None


class MSArgs(_StoreArgs):
    embeddings: FilePath
    out: Path = Path("runs/ms")
    bins: int = Field(default=50, ge=1)


S = TypeVar("S", bound=_StoreArgs)
R = TypeVar("R")

_SAE = arg("--sae", required=True, metavar="DIR", help="VL-SAE checkpoint directory or Hub id")
_POOLING = field_arg(
    _ConceptArgs,
    "pooling",
    "--pooling",
    choices=field_choices(_ConceptArgs, "pooling"),
    fill=True,
    help="an image's activation of a concept: mean or max over its tokens, or cls: its CLS "
    "token alone (SAEs trained at the vision tower)",
)
_STORE = field_arg(
    _StoreArgs,
    "store",
    "--store",
    required=True,
    type=Path,
    metavar="STORE",
    help="store of `collect`",
)
_OVERWRITE = arg("--overwrite", action="store_true", help="replace what a non-empty --out holds")


@contextmanager
def _concepts_usage() -> Iterator[None]:
    """The expected failures of the concept commands become usage errors (no traceback)."""
    from ..concepts import ConceptsError
    from ..pipeline.store import StoreError

    try:
        yield
    except (ConceptsError, StoreError) as e:
        raise UsageError(str(e)) from e


@subcommand(
    "inspect",
    "top concepts of an image or a text, with labels and what the guard keeps or removes",
    _SAE,
    arg("--model", required=True, help="LLaVA checkpoint folder or Hub id"),
    field_arg(InspectArgs, "image", "--image", type=Path, metavar="FILE", help="image to inspect"),
    field_arg(
        InspectArgs,
        "text",
        "--text",
        metavar="TEXT",
        help="text to inspect (with --image: the prompt)",
    ),
    field_arg(InspectArgs, "top", "--top", type=int, fill=True, help="concepts listed"),
    _POOLING,
    field_arg(
        InspectArgs,
        "catalog",
        "--catalog",
        type=Path,
        metavar="catalog.json",
        help="labels from `vlsae-guard catalog`",
    ),
    *rewrite_args(),
    arg(
        "--text-grounded",
        action="store_true",
        help="guard keeps only concepts --text activates too (the text as given, no template)",
    ),
    field_arg(InspectArgs, "device", "--device", fill=True, help="cpu, cuda, cuda:1, ..."),
    arg("--json", type=Path, metavar="FILE", help="also write the result as JSON"),
)
def inspect_command(args: argparse.Namespace) -> None:
    """Run the image (and/or text) through the model up to the SAE's site, encode its tokens
    and pool them per concept; list the strongest concepts with their labels. For an image and
    a projector-site SAE, also list which of its concepts the guard keeps (the shared set) and
    which it removes: what separates the guarded answer from the unguarded one. An SAE without
    a text side (vision-encoder SAEs) reads the image only, and says so."""
    from ..backends import load as load_model
    from ..concepts.catalog import read_catalog
    from ..concepts.inspect import format_inspection, inspect_rows, read_tokens
    from ..concepts.pooled import text_skipped
    from ..core.intervention import GuardConfig

    opts = validated_flags(InspectArgs, args, across="--image/--text")
    with _concepts_usage():
        labels = read_catalog(opts.catalog).labels() if opts.catalog else {}
        image = _open_image(opts.image) if opts.image else None
        sae = load(args.sae).eval()
        model, inputs = load_model(args.model, device=opts.device)
        sae = sae.to(opts.device)
        rows = read_tokens(model, inputs, sae, image, opts.text)
        skipped = text_skipped(sae)
        notes = []
        guard = None
        if sae.config.source.site in (None, "projector"):
            if skipped:
                notes.append(f"guard: no kept/removed split, {skipped} (no shared concepts)")
            else:
                guard = GuardConfig(rewrite=rewrite_flag(args), text_grounded=args.text_grounded)
        if skipped and opts.text is not None:
            notes.append(f"text {opts.text!r}: not read, {skipped}")
        report: dict[str, Any] = {}
        for modality, name in (("vision", str(opts.image)), ("text", repr(opts.text))):
            if modality not in rows:
                continue
            result = inspect_rows(
                sae,
                rows[modality],
                modality,
                pooling=opts.pooling,
                top=opts.top,
                labels=labels,
                guard=guard if modality == "vision" else None,
                text_rows=rows.get("text"),
            )
            print(format_inspection(f"{modality} {name}", result, opts.top))
            report[modality] = result.to_json()
        for note in notes:
            print(note)
        if notes:
            report["notes"] = notes
    write_json(args.json, report)


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"{path}: not readable as an image ({e})") from e


def _over_store(
    args: argparse.Namespace,
    model: type[S],
    run: Callable[[S, ActivationStore, SparseAutoencoder], R],
) -> tuple[S, R]:
    """What catalog and ms share: validate the flags, refuse a non-empty or unwritable --out
    before any work, load the SAE, open the store and ``run(opts, store, sae)`` on them."""
    from ..pipeline.store import ActivationStore

    opts = validated_flags(model, args)
    refuse_non_empty(opts.out, args.overwrite)
    check_writable(opts.out)
    with _concepts_usage():
        sae = load(args.sae).eval()
        return opts, run(opts, ActivationStore(opts.store), sae)


@subcommand(
    "catalog",
    "each concept's top images and captions in a store, labelled; JSON + static HTML",
    _SAE,
    _STORE,
    field_arg(
        CatalogArgs,
        "out",
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="catalog.json, index.html, thumbs",
    ),
    field_arg(
        CatalogArgs, "top_n", "--top-n", type=int, fill=True, help="images and captions per concept"
    ),
    _POOLING,
    field_arg(
        CatalogArgs,
        "concepts",
        "--concepts",
        type=int,
        nargs="+",
        metavar="K",
        help="only these concepts",
    ),
    field_arg(
        CatalogArgs, "label_words", "--label-words", type=int, fill=True, help="words per label"
    ),
    field_arg(
        CatalogArgs,
        "label_docs",
        "--label-docs",
        type=int,
        fill=True,
        help="top images and captions whose captions the label reads",
    ),
    field_arg(
        CatalogArgs,
        "image_root",
        "--image-root",
        type=Path,
        metavar="DIR",
        help="base of relative image paths",
    ),
    _OVERWRITE,
)
def catalog_command(args: argparse.Namespace) -> None:
    """Encode every image and caption of a store with the SAE, keep each concept's N strongest
    images and captions, label it with its most characteristic caption words (lift,
    stopwords removed), and write catalog.json plus index.html with thumbnails."""
    from ..concepts.catalog import build_catalog, write_catalog

    opts, catalog = _over_store(
        args,
        CatalogArgs,
        lambda opts, store, sae: build_catalog(
            store,
            sae,
            top_n=opts.top_n,
            pooling=opts.pooling,
            concepts=opts.concepts,
            label_size=opts.label_words,
            label_docs=opts.label_docs,
            sae_name=str(args.sae),
        ),
    )
    written = write_catalog(catalog, opts.out, opts.image_root)
    captions = f"and {catalog.captions} captions"
    if catalog.text_skipped:
        captions = f"(captions not read: {catalog.text_skipped})"
    print(
        f"{len(catalog.concepts)} concepts of {catalog.n_concepts} over {catalog.images} images "
        f"{captions}; {written['thumbnails']} thumbnails\n"
        f"wrote {written['json']}\nwrote {written['html']}"
    )


@subcommand(
    "ms",
    "monosemanticity score of the SAE's concepts over a store's images, vs raw neurons",
    _SAE,
    _STORE,
    field_arg(
        MSArgs,
        "embeddings",
        "--embeddings",
        required=True,
        type=Path,
        metavar="FILE",
        help="image embeddings of a separate encoder: .safetensors (tensor 'embeddings', "
        "metadata 'images' or 'ids') or .npz (arrays 'embeddings' and 'images' or 'ids')",
    ),
    _POOLING,
    field_arg(MSArgs, "out", "--out", type=Path, fill=True, help="output folder"),
    field_arg(MSArgs, "bins", "--bins", type=int, fill=True, help="histogram bins"),
    arg("--no-baseline", action="store_true", help="skip the raw-neuron baseline"),
    _OVERWRITE,
)
def ms_command(args: argparse.Namespace) -> None:
    """MS_k = sum_{n<m} a_n a_m s_nm / sum_{n<m} a_n a_m (activations min-max normalised per
    concept, s = cosine similarity of the embeddings), in closed form, streamed over the
    store. Prints the distribution (mean, median, best, dead) for the SAE's concepts and for
    the model's raw neurons (the paper's baseline), and for each group of a Matryoshka SAE;
    writes ms.json and ms_histogram.png. --pooling cls scores the CLS token, as the paper does
    (SAEs trained at the vision tower)."""
    from ..concepts.ms_store import histogram, store_monosemanticity

    opts, result = _over_store(
        args,
        MSArgs,
        lambda opts, store, sae: store_monosemanticity(
            store, sae, opts.embeddings, opts.pooling, not args.no_baseline
        ),
    )
    summaries = result.summaries()
    print(f"monosemanticity over {result.images} images ({opts.pooling} pooling)")
    for name, s in summaries.items():
        best = s["best"]
        best_text = f"{best['score']:.4f} (#{best['unit']})" if best else "n/a"
        print(
            f"  {name:<12} units {s['units']:>6}  dead {s['dead']:>6}  mean {s['mean']:.4f}  "
            f"median {s['median']:.4f}  best {best_text}"
        )
    png = histogram(result, opts.out / "ms_histogram.png", opts.bins)
    scores = {"sae": result.scores.tolist()}
    if result.baseline is not None:
        scores["raw_neurons"] = result.baseline.tolist()
    record = {"images": result.images, "pooling": opts.pooling, "summary": summaries}
    if result.groups is not None:  # Matryoshka: each concept's group level, as scores["sae"]
        record["concept_groups"] = result.groups.tolist()
    write_json(opts.out / "ms.json", record | {"scores": _nan_to_none(scores)})
    print(f"wrote {png}")


@subcommand(
    "object-map",
    "fit cue masking's object map: each object's concepts and the labels' co-occurrences",
    _SAE,
    arg("--model", required=True, help="LLaVA checkpoint folder or Hub id"),
    arg("--labels", required=True, type=Path, metavar="FILE",
        help='JSON lines {"image": PATH, "objects": [NAME, ...]}: the objects each image holds, '
        "from the data the model learned from (e.g. COCO's annotations)"),
    arg("--images", required=True, type=Path, metavar="DIR", help="folder the image paths are in"),
    field_arg(ObjectMapConfig, "out", "--out", type=Path, metavar="FILE", help="the map to write",
              unset="SAE/objects.json, where cue masking looks"),
    field_arg(ObjectMapConfig, "top", "--top", type=int, fill=True, help="concepts per object"),
    field_arg(ObjectMapConfig, "calibrate", "--calibrate", type=float, fill=True,
              help="share of the images held out for each object's recall-floor quantiles"),
    field_arg(ObjectMapConfig, "batch_size", "--batch-size", type=int, fill=True),
    field_arg(ObjectMapConfig, "device", "--device", fill=True, help="cpu, cuda, ..."),
)  # fmt: skip
def object_map_command(args: argparse.Namespace) -> None:
    """Project each labelled image, encode its tokens with the projector SAE, pool them per
    concept, and fit each object's concepts by least squares of the concepts on the objects'
    indicators (the other objects held fixed), with the labels' co-occurrence statistics that
    name each object's cues (vlsae_guard.core.object_evidence)."""
    from ..concepts.object_map import build_object_map

    opts = validated_flags(ObjectMapConfig, args)
    try:
        written = build_object_map(opts)
    except (ValueError, OutputError) as e:
        raise UsageError(str(e)) from e
    print(f"wrote {written}")


def _nan_to_none(scores: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """JSON has no NaN: dead units are written as null."""
    return {k: [None if v != v else v for v in vs] for k, vs in scores.items()}
