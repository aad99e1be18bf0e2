"""The steering score of Pach et al. (2025), "Sparse Autoencoders Learn Monosemantic Features in
Vision-Language Models" (ExplainableML/sae-for-vlm, ``steering_score.py``): does clamping one
concept of a vision-encoder SAE make LLaVA name what the concept's images show?

For concept ``j``: its top images are the ``top_images`` images (of ``images``) on whose CLS token,
at the SAE's site ``vision_tower:L``, ``j`` is most active; its reference ``r_j`` is the mean of
their CLIP image embeddings. Every steer image ``i`` is asked "What is shown in this image? Use
exactly one word!" (greedy, 5 new tokens, the answer's first word) by the model with ``j``
clamped to ``value`` (:func:`vlsae_guard.guard` at ``vision_tower:L``), giving ``w_ij``, and by
the plain model, giving ``w_i``. With ``t`` CLIP's text embedding::

    score = mean_{j,i} cos(t(w_ij), r_j) - mean_{j,i} cos(t(w_i), r_j)

The paper runs the steered and the unsteered script separately and compares their means; here
both come from one run. As there, the reference is the mean of the unnormalised embeddings and
the first word is kept as answered (punctuation included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from ..backends import Inputs, load, resolve_dtype
from ..core.checkpoint import load as load_sae
from ..core.guard import guard
from ..core.intervention import MAX_STEER
from ..core.sae import SparseAutoencoder
from ..core.sae_config import vision_tower_layer
from ..harness.generation import Decoding
from ..pipeline.collect import SiteReader
from ..pipeline.pairs import ImageError, Pair, PairSource
from ..scoring.files import DataError, read_records
from ..validation import FrozenRecord, FrozenSettings
from .pooled import ConceptsError, encode, group_levels

PROMPT = "What is shown in this image? Use exactly one word!"
DEFAULT_TOP = 10  # concepts scored when neither ``concepts`` nor ``top`` is given


class SteerScoreConfig(FrozenSettings):
    """Settings of ``vlsae-guard steer-score``."""

    model: str  # LLaVA checkpoint folder or Hub id
    sae: str  # a vision-encoder SAE (site vision_tower:L)
    scorer: str  # a local transformers CLIPModel folder with its tokenizer and image processor
    # A folder of images (recursively) or JSON lines {"image": path[, "id": ...]}, paths relative
    # to the file's folder: where each concept's top images are found.
    images: Path
    steer_images: Path | None = None  # the images answered with and without steering; None: images
    concepts: list[int] | None = Field(default=None, min_length=1)
    top: int = Field(default=DEFAULT_TOP, ge=1)  # without concepts: the N most active on images
    value: float = Field(default=100.0, ge=-MAX_STEER, le=MAX_STEER)  # the paper's clamp
    pre_zero: bool = False
    keep_error: bool = False
    site: str | None = None  # vision_tower:L; None: the SAE's training site
    prompt: str = PROMPT
    top_images: int = Field(default=16, ge=1)
    max_new_tokens: int = Field(default=5, ge=1)
    batch_size: int = Field(default=8, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "cpu"
    seed: int = 0
    out: Path = Path("runs/steer-score")

    @field_validator("concepts")
    @classmethod
    def _concepts(cls, concepts: list[int] | None) -> list[int] | None:
        if concepts is not None and (min(concepts) < 0 or len(set(concepts)) < len(concepts)):
            raise ValueError("concept indices must be >= 0 and distinct")
        return concepts

    @field_validator("site")
    @classmethod
    def _site(cls, site: str | None) -> str | None:
        if site is not None and vision_tower_layer(site) is None:
            raise ValueError("the steering score steers at the vision tower: 'vision_tower:L'")
        return site and f"vision_tower:{vision_tower_layer(site)}"

    @model_validator(mode="after")
    def _concepts_or_top(self) -> SteerScoreConfig:
        if self.concepts is not None and "top" in self.model_fields_set:
            raise ValueError("give concepts or top, not both")
        return self

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.max_new_tokens)  # greedy


class ImageSet(FrozenRecord):
    path: str
    count: int
    fingerprint: str  # sha256 over the images' ids and paths (PairSource.fingerprint)


class ConceptScore(FrozenRecord):
    concept: int
    group: int | None  # Matryoshka level (0: the most general); None for other SAEs
    top_images: list[str]  # ids, most active first (only images where the concept is active)
    top_activations: list[float]
    words: list[str]  # the steered answer's first word, per steer image
    cos_steered: float
    cos_unsteered: float
    difference: float


class SteerScoreResult(FrozenRecord):
    site: str
    image_sets: dict[str, ImageSet]
    steer_images: list[str]  # ids, in the order of every ``words`` list
    unsteered_words: list[str]
    concepts: list[ConceptScore]
    cos_steered: float
    cos_unsteered: float
    score: float  # cos_steered - cos_unsteered


# --- images ------------------------------------------------------------------------------------


def image_source(path: Path) -> PairSource:
    """The images of a folder (recursively, sorted; id: the path within the folder) or of a JSON
    lines file, as caption-less pairs (opened only when used). An empty set is an error."""
    path = Path(path)
    if path.is_dir():
        suffixes = {s for s, kind in Image.registered_extensions().items() if kind in Image.OPEN}
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        pairs = [Pair(str(p.relative_to(path)), str(p), "") for p in files]
    elif path.is_file():
        pairs = _jsonl_images(path)
    else:
        raise ConceptsError(f"{path}: no such folder or JSON lines file of images")
    if not pairs:
        raise ConceptsError(f"{path}: no images (a folder of image files, or JSON lines)")
    return PairSource(pairs, {"path": str(path)})


def _jsonl_images(file: Path) -> list[Pair]:
    pairs = []
    try:
        for number, record in read_records(file):
            image = record.get("image")
            if not isinstance(image, str):
                raise ConceptsError(f'{file}:{number}: expected {{"image": path}}, found {record}')
            pairs.append(Pair(str(record.get("id", image)), str(file.parent / image), ""))
    except (OSError, DataError) as e:
        raise ConceptsError(f"{file}: not readable as JSON lines of images ({e})") from e
    return pairs


def open_images(source: PairSource, pairs: Sequence[Pair]) -> list[Image.Image]:
    try:
        return [source.load_image(p) for p in pairs]
    except ImageError as e:
        raise ConceptsError(f"{source.describe['path']}: image {e}") from e


def describe(source: PairSource) -> ImageSet:
    return ImageSet(
        path=source.describe["path"], count=len(source), fingerprint=source.fingerprint()
    )


# --- which concepts, which images --------------------------------------------------------------


def steering_site(sae: SparseAutoencoder, site: str | None) -> str:
    """``vision_tower:L``: ``site`` or the SAE's own; an SAE trained elsewhere is refused."""
    source = sae.config.source
    if source.site not in (None, "vision_tower"):
        raise ConceptsError(
            "the steering score clamps concepts of a vision-encoder SAE at vision_tower:L "
            f"(Pach et al., 2025); this SAE was trained at {source.place}"
        )
    if site is None and source.site is None:
        raise ConceptsError("the SAE records no training site: give site='vision_tower:L'")
    return site or source.place


def check_concepts(sae: SparseAutoencoder, concepts: Sequence[int] | None) -> None:
    wrong = [c for c in concepts or () if c >= sae.n_concepts]
    if wrong:
        raise ConceptsError(
            f"concepts {wrong[:5]} are out of range for an SAE with {sae.n_concepts} concepts"
        )


@dataclass
class TopImages:
    """Each concept's most active images on the CLS token, and its total activation there."""

    indices: Tensor  # (K, t) image indices, most active first
    values: Tensor  # (K, t)
    totals: Tensor  # (K,)

    def of(self, concept: int) -> tuple[list[int], list[float]]:
        """The concept's top images where it is active at all."""
        active = self.values[concept] > 0
        return self.indices[concept][active].tolist(), self.values[concept][active].tolist()


@torch.inference_mode()
def find_top_images(
    reader: SiteReader, sae: SparseAutoencoder, source: PairSource, top: int, batch_size: int
) -> TopImages:
    """One pass over ``source``: every concept's ``top`` images by its activation on the image's
    CLS token (the first crop's; Pach et al. score CLIP's CLS token). Ties: the earlier image."""
    k = sae.n_concepts
    values, indices, totals = torch.empty(k, 0), torch.empty(k, 0, dtype=torch.long), torch.zeros(k)
    for start in range(0, len(source), batch_size):
        pairs = source[start : start + batch_size]
        rows = reader(open_images(source, pairs), [""] * len(pairs), list(range(len(pairs))))
        cls = torch.stack([vision[0] for vision, _ in rows]).to(sae.dtype)
        dense = encode(sae, cls, "vision").dense()  # (B, K)
        totals += dense.sum(0)
        values = torch.cat([values, dense.T], dim=1)
        here = torch.arange(start, start + len(pairs)).expand(k, -1)
        indices = torch.cat([indices, here], dim=1)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, :top]
        values, indices = values.gather(1, order), indices.gather(1, order)
    return TopImages(indices, values, totals)


def choose_concepts(found: TopImages, concepts: Sequence[int] | None, top: int) -> list[int]:
    """``concepts`` (each must be active on some image), or the ``top`` with the largest total
    CLS activation over the images."""
    if concepts is not None:
        dead = [c for c in concepts if not found.of(c)[0]]
        if dead:
            raise ConceptsError(
                f"concepts {dead[:5]} are not active on the CLS token of any image: they have "
                "no top images to compare the answers with"
            )
        return list(concepts)
    order = found.totals.sort(descending=True, stable=True).indices
    chosen = [c for c in order[:top].tolist() if found.totals[c] > 0]
    if not chosen:
        raise ConceptsError("no concept is active on the CLS token of any image")
    return chosen


# --- answers and embeddings --------------------------------------------------------------------


def first_word(answer: str) -> str:
    """The paper's label: the answer's first word, as answered ("" for an empty answer)."""
    words = answer.split()
    return words[0] if words else ""


def answer_words(
    model,
    inputs: Inputs,
    images: Sequence[Image.Image],
    config: SteerScoreConfig,
    runner: Callable | None = None,
) -> list[str]:
    """First words of the answers to ``config.prompt``, in batches (left-padded by the backend,
    so a batch answers as each image alone)."""
    kwargs = config.decoding.kwargs()
    words = []
    for start in range(0, len(images), config.batch_size):
        batch = images[start : start + config.batch_size]
        answers = inputs.generate(model, batch, [config.prompt] * len(batch), kwargs, runner)
        words += [first_word(a) for a in answers]
    return words


def _features(out) -> Tensor:
    """transformers 5 returns a model output with the projected ``pooler_output``; 4 a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipScorer:
    """A CLIP model's text and image embeddings (the projections CLIP compares)."""

    def __init__(self, directory: str, device: str = "cpu"):
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            kind = AutoConfig.from_pretrained(directory).model_type
        except (OSError, ValueError) as e:
            raise ConceptsError(f"scorer {directory}: not a transformers model folder ({e})") from e
        if kind != "clip":
            raise ConceptsError(
                f"scorer {directory}: a {kind!r} model; the steering score embeds words and "
                "images with a CLIP model (CLIPModel, e.g. openai/clip-vit-base-patch32)"
            )
        try:
            self.model = CLIPModel.from_pretrained(directory).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
            self.processor = AutoImageProcessor.from_pretrained(directory)
        except (OSError, ValueError) as e:
            raise ConceptsError(f"scorer {directory}: cannot load the CLIP model ({e})") from e
        self.device = torch.device(device)

    @torch.inference_mode()
    def text(self, words: Sequence[str], batch_size: int = 256) -> dict[str, Tensor]:
        """Each distinct word's text embedding."""
        unique = list(dict.fromkeys(words))
        out = {}
        for start in range(0, len(unique), batch_size):
            batch = unique[start : start + batch_size]
            tokens = self.tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
            embedded = self.model.get_text_features(**tokens.to(self.device))
            out.update(zip(batch, _features(embedded).float().cpu(), strict=True))
        return out

    @torch.inference_mode()
    def images(self, images: Sequence[Image.Image]) -> Tensor:
        """Each image's image embedding."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self.model.parameters()).dtype)
        return _features(self.model.get_image_features(pixel_values=pixels)).float().cpu()


def mean_cosine(embeddings: dict[str, Tensor], words: Sequence[str], reference: Tensor) -> float:
    """mean_i cos(t(words_i), reference)."""
    rows = torch.stack([embeddings[w] for w in words]).double()
    return float(F.cosine_similarity(rows, reference.double().unsqueeze(0), dim=1).mean())


# --- the score ---------------------------------------------------------------------------------


def run_steer_score(
    model,
    inputs: Inputs,
    sae: SparseAutoencoder,
    scorer: ClipScorer,
    config: SteerScoreConfig,
    images: PairSource,
    steer: PairSource,
) -> SteerScoreResult:
    """The score on a loaded model, SAE and scorer, over the listed ``images`` (top images) and
    ``steer`` (answered); see the module's docstring."""
    torch.manual_seed(config.seed)
    site = steering_site(sae, config.site)
    check_concepts(sae, config.concepts)
    settings = {"site": site, "pre_zero": config.pre_zero, "keep_error": config.keep_error}
    guard(model, sae, **settings).remove()  # a site that does not fit is refused before any work
    reader = SiteReader(model, inputs, layer=None, vision_layer=vision_tower_layer(site))
    found = find_top_images(reader, sae, images, config.top_images, config.batch_size)
    chosen = choose_concepts(found, config.concepts, config.top)
    pictures = open_images(steer, steer.pairs)
    plain = answer_words(model, inputs, pictures, config)
    steered = {}
    for concept in chosen:
        with guard(model, sae, steer={concept: config.value}, **settings) as handle:
            steered[concept] = answer_words(model, inputs, pictures, config, handle.generate)
    texts = scorer.text(plain + [w for words in steered.values() for w in words])
    tops = {c: found.of(c) for c in chosen}
    embedded = embed_images(scorer, images, {i for ids, _ in tops.values() for i in ids}, config)
    levels = group_levels(sae)
    scores = []
    for concept in chosen:
        ids, activations = tops[concept]
        reference = torch.stack([embedded[i] for i in ids]).mean(0)
        cos_steered = mean_cosine(texts, steered[concept], reference)
        cos_unsteered = mean_cosine(texts, plain, reference)
        scores.append(
            ConceptScore(
                concept=concept,
                group=None if levels is None else int(levels[concept]),
                top_images=[images[i].id for i in ids],
                top_activations=activations,
                words=steered[concept],
                cos_steered=cos_steered,
                cos_unsteered=cos_unsteered,
                difference=cos_steered - cos_unsteered,
            )
        )
    cos_steered = sum(s.cos_steered for s in scores) / len(scores)
    cos_unsteered = sum(s.cos_unsteered for s in scores) / len(scores)
    return SteerScoreResult(
        site=site,
        image_sets={"images": describe(images), "steer_images": describe(steer)},
        steer_images=[p.id for p in steer.pairs],
        unsteered_words=plain,
        concepts=scores,
        cos_steered=cos_steered,
        cos_unsteered=cos_unsteered,
        score=cos_steered - cos_unsteered,
    )


def embed_images(
    scorer: ClipScorer, source: PairSource, indices: set[int], config: SteerScoreConfig
) -> dict[int, Tensor]:
    """The image embeddings of ``source``'s images at ``indices``, in batches."""
    needed, out = sorted(indices), {}
    for start in range(0, len(needed), config.batch_size):
        batch = needed[start : start + config.batch_size]
        pictures = open_images(source, [source[i] for i in batch])
        out.update(zip(batch, scorer.images(pictures), strict=True))
    return out


def steer_score(config: SteerScoreConfig) -> SteerScoreResult:
    """List the images, load the SAE, the scorer and the model (cheapest first, so a wrong input
    fails before the model loads) and compute the score."""
    images = image_source(config.images)
    steer = image_source(config.steer_images) if config.steer_images else images
    sae = load_sae(config.sae).eval().to(config.device)
    steering_site(sae, config.site)
    check_concepts(sae, config.concepts)
    scorer = ClipScorer(config.scorer, config.device)
    model, inputs = load(config.model, resolve_dtype(config.dtype, config.device), config.device)
    return run_steer_score(model, inputs, sae, scorer, config, images, steer)
