"""A generated world where object hallucination is planted on purpose and can be measured.

Images show 1-4 objects of a few classes, each a shape in a colour of its own, on a dark
background with grey clutter; the B object of each bias pair is drawn smaller, so it is harder
to see than the A that predicts it (as the small objects that real LVLMs hallucinate). In the
*training* split each bias pair (A, B) co-occurs at a set rate: of the images that contain A,
``bias_rate`` also contain B. That is the shortcut behind object hallucination in real LVLMs
(a model that learned it says "yes" to B whenever A is there). Validation and test images draw
their objects independently, which breaks the bias.

Questions are built the POPE way (Li et al., 2023): per image as many "no" as "yes" questions,
negatives drawn at random (``random``), among the most frequent objects (``popular``), or among
the objects that co-occur most with the image's objects (``adversarial``), with the statistics
taken from the training split. A fourth set, ``bias``, asks about B exactly where the bias is
broken: "no" where A is present without B (the hallucination the shortcut causes), "yes" where
B is present without A.

Two causes are planted (issue 16). *Named co-occurrence* (the bias pairs above): A and B are both
named in the captions, so the shortcut can live in the language model. *Unnamed visual
context* (:class:`ContextConfig`): a background of diagonal stripes that no caption mentions
comes with the context object C in most training images, as water comes with boats; it is drawn
independently of C in validation and test. Its question set, ``context``, asks about C: "no" on
striped images without C, "yes" where C is present without stripes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from pydantic import Field, model_validator

from ...scoring.pope import build_prompt
from ...validation import FrozenSettings

COLOURS = {
    "red": (215, 50, 45),
    "green": (50, 180, 70),
    "blue": (55, 95, 225),
    "yellow": (230, 205, 50),
    "orange": (240, 130, 30),
    "purple": (150, 60, 200),
    "pink": (240, 120, 190),
    "cyan": (60, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "ring")
SPLITS = ("train", "val", "test")
QUESTION_SETS = ("random", "popular", "adversarial", "bias", "context")
# The planted causes, by the name results use, and the question set that measures each.
CAUSES = {"cooccurrence": "bias", "context": "context"}
STRIPES = (35, 95, 120)  # the context cue's colour: muted teal, unlike every object colour
QUESTION = "Is there a {name} in the image?"
CAPTIONS = (
    "A picture of {objects}.",
    "There is {objects} in the image.",
    "This image contains {objects}.",
    "I can see {objects}.",
    "In this picture there is {objects}.",
)


class ObjectClass(FrozenSettings):
    name: str  # one word of the tiny tokenizer's vocabulary
    shape: Literal["circle", "square", "triangle", "ring"]
    colour: Literal["red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan"]
    scale: float = Field(default=1.0, gt=0, le=1)  # times the drawn size


DEFAULT_CLASSES = (
    ObjectClass(name="ball", shape="circle", colour="red"),
    ObjectClass(name="apple", shape="circle", colour="green"),
    ObjectClass(name="box", shape="square", colour="blue"),
    ObjectClass(name="book", shape="square", colour="orange"),
    ObjectClass(name="kite", shape="triangle", colour="yellow", scale=0.5),
    ObjectClass(name="cake", shape="triangle", colour="pink"),
    ObjectClass(name="ring", shape="ring", colour="purple", scale=0.5),
    ObjectClass(name="clock", shape="ring", colour="cyan", scale=0.5),
)


class ContextConfig(FrozenSettings):
    """The unnamed visual context: striped backgrounds that predict ``object`` in training.

    ``object``: a class name; ``"auto"``: the last class in no bias pair (so a world written
    before this cause existed gets one without naming it); None: no context cause."""

    object: str | None = "auto"
    share: float = Field(default=0.3, gt=0, lt=1)  # images with the stripes, in every split
    rate: float = Field(default=0.97, ge=0, le=1)  # P(C | stripes) in the training split
    rate_without: float = Field(default=0.05, ge=0, le=1)  # P(C | no stripes) in training


class WorldConfig(FrozenSettings):
    """Everything a world is generated from (with the seed)."""

    classes: tuple[ObjectClass, ...] = DEFAULT_CLASSES
    bias_pairs: tuple[tuple[str, str], ...] = (("ball", "kite"), ("book", "clock"))
    bias_rate: float = Field(default=0.97, ge=0, le=1)  # P(B | A) in the training split
    n_train: int = Field(default=3000, ge=1)
    n_val: int = Field(default=100, ge=1)
    n_test: int = Field(default=250, ge=1)
    image_size: int = Field(default=32, ge=16)
    min_objects: int = Field(default=1, ge=1)
    max_objects: int = Field(default=4, ge=1)
    object_size: tuple[float, float] = (0.25, 0.45)  # side, as a fraction of the image
    clutter: int = Field(default=3, ge=0)  # grey specks and strokes per image, at most
    questions_per_image: int = Field(default=2, ge=1)  # "yes" (and as many "no") per image
    context: ContextConfig = ContextConfig()

    @model_validator(mode="after")
    def _check(self) -> WorldConfig:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be distinct, got {names}")
        if len({(c.shape, c.colour) for c in self.classes}) != len(names):
            raise ValueError("two classes share a shape and a colour: they could not be told apart")
        if self.min_objects > self.max_objects or self.max_objects >= len(names):
            raise ValueError(
                f"need min_objects <= max_objects < number of classes ({len(names)}) so that "
                "every image has absent objects to ask about"
            )
        used = [n for pair in self.bias_pairs for n in pair]
        if unknown := sorted(set(used) - set(names)):
            raise ValueError(f"bias_pairs name unknown classes {unknown}")
        if len(set(used)) != len(used):
            raise ValueError("bias pairs must not share objects (their rates would interfere)")
        if len(self.bias_pairs) > self.max_objects - 1:
            raise ValueError("max_objects must leave room for every bias pair's B")
        c = self.context.object
        if c is not None and c != "auto" and (c not in names or c in used):
            free = sorted(set(names) - set(used))
            raise ValueError(
                f"context.object: expected a class in no bias pair ({free}), 'auto' or null; "
                f"found {c!r}"
            )
        lo, hi = self.object_size
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"object_size must satisfy 0 < low <= high <= 1, got {lo, hi}")
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def paired(self) -> set[str]:
        """The objects of the bias pairs (A and B of each)."""
        return {n for pair in self.bias_pairs for n in pair}

    @property
    def context_object(self) -> str | None:
        """The context cause's object C (``context.object`` resolved; ``"auto"`` with every
        class in a bias pair: no context cause), or None."""
        if self.context.object != "auto":
            return self.context.object
        free = [n for n in self.names if n not in self.paired]
        return free[-1] if free else None

    @property
    def question_sets(self) -> tuple[str, ...]:
        """The question sets this world asks (``context`` only with a context cause)."""
        return tuple(q for q in QUESTION_SETS if q != "context" or self.context_object)

    @property
    def causes(self) -> dict[str, str]:
        """The planted causes (``cooccurrence``, ``context``) and their question sets."""
        return {c: q for c, q in CAUSES.items() if q in self.question_sets}


@dataclass
class Scene:
    """One image with its ground truth: ``objects`` in drawing order, with boxes."""

    name: str  # image file name
    objects: list[str]
    boxes: list[tuple[int, int, int, int]]
    image: Image.Image
    caption: str  # never mentions the stripes
    stripes: bool = False  # the context cue is drawn

    @property
    def present(self) -> set[str]:
        return set(self.objects)


@dataclass
class Statistics:
    """Object frequencies and pairwise co-occurrence counts of a set of scenes."""

    frequency: Counter = field(default_factory=Counter)
    cooccurrence: Counter = field(default_factory=Counter)  # key: sorted (a, b)

    @classmethod
    def of(cls, scenes: list[Scene]) -> Statistics:
        stats = cls()
        for scene in scenes:
            stats.frequency.update(scene.present)
            stats.cooccurrence.update(combinations(sorted(scene.present), 2))
        return stats

    def together(self, a: str, b: str) -> int:
        return self.cooccurrence[tuple(sorted((a, b)))]

    def rate(self, a: str, b: str) -> float:
        """P(b | a): the share of the scenes with ``a`` that also contain ``b``."""
        return self.together(a, b) / self.frequency[a] if self.frequency[a] else float("nan")


@dataclass(frozen=True)
class Question:
    question_id: int
    image: str
    name: str  # the object asked about
    label: str  # "yes" | "no"

    @property
    def text(self) -> str:
        return QUESTION.format(name=self.name)

    def record(self) -> dict:
        """A POPE question-file line."""
        return {
            "question_id": self.question_id,
            "image": self.image,
            "text": self.text,
            "label": self.label,
        }


@dataclass
class World:
    config: WorldConfig
    seed: int
    splits: dict[str, list[Scene]]

    @cached_property
    def statistics(self) -> Statistics:
        """Training-split statistics: what POPE's popular/adversarial sampling ranks by."""
        return Statistics.of(self.splits["train"])

    def questions(self, split: str) -> dict[str, list[Question]]:
        """The question sets about ``split`` (val or test), deterministic per seed."""
        return {kind: build_questions(self, split, kind) for kind in self.config.question_sets}

    def write(self, split: str, directory: Path, questions: bool = True) -> dict[str, Path]:
        """PNG images under ``directory/images`` (+ POPE question files); returns the paths."""
        images = directory / "images"
        images.mkdir(parents=True, exist_ok=True)
        for scene in self.splits[split]:
            target = images / scene.name
            if not target.exists():
                scene.image.save(target)
        paths = {"images": images}
        if questions:
            for kind, qs in self.questions(split).items():
                paths[kind] = directory / f"{kind}.jsonl"
                paths[kind].write_text("".join(json.dumps(q.record()) + "\n" for q in qs))
        return paths

    def write_pairs(self, out: Path, n: int) -> Path:
        """The first ``n`` training images with their captions as a pairs file (``collect``'s
        jsonl; images written under ``out/images``)."""
        images = self.write("train", out, questions=False)["images"]
        pairs = out / "pairs.jsonl"
        pairs.write_text(
            "".join(
                json.dumps({"id": s.name, "image": f"{images.name}/{s.name}", "caption": s.caption})
                + "\n"
                for s in self.splits["train"][:n]
            )
        )
        return pairs


def build_world(config: WorldConfig, seed: int) -> World:
    """All splits of the world for ``seed``; each split has its own random stream."""
    splits = {}
    for code, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, code])
        n = getattr(config, f"n_{split}")
        splits[split] = [
            _scene(config, rng, f"{split}_{i:05d}.png", biased=split == "train") for i in range(n)
        ]
    return World(config, seed, splits)


def _objects(config: WorldConfig, rng: np.random.Generator, biased: bool) -> tuple[list, bool]:
    """The objects of one image and whether it has the stripes; ``biased`` (training): the bias
    pairs and the context decide on their B and C. A world without a context cause makes the
    same random draws as before the cause existed."""
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    names = [str(x) for x in rng.choice(config.names, size=n, replace=False)]
    c = config.context_object
    stripes = c is not None and bool(rng.random() < config.context.share)
    if not biased:
        return names, stripes
    fixed: set[str] = set()  # objects a bias pair has decided on: later pairs keep them
    for a, b in config.bias_pairs:
        if a not in names:
            continue
        fixed.add(a)
        _decide(config, rng, names, b, rng.random() < config.bias_rate, fixed)
    if c is not None:
        rate = config.context.rate if stripes else config.context.rate_without
        _decide(config, rng, names, c, rng.random() < rate, fixed)
    return names, stripes


def _decide(config: WorldConfig, rng, names: list[str], b: str, want: bool, fixed: set) -> None:
    """Put ``b`` in or out of ``names`` (in place), keeping the objects in ``fixed`` (if they
    fill every slot, ``b`` stays out: only the context object can meet that)."""
    if want and b not in names:
        free = [i for i, x in enumerate(names) if x not in fixed]
        if len(names) < config.max_objects:
            names.append(b)
        elif free:
            names[free[int(rng.integers(len(free)))]] = b
        else:
            return
    elif not want and b in names:
        names.remove(b)
        if not names:  # only the context object was drawn: another object of no cause instead
            others = [x for x in config.names if x not in config.paired | {b}]
            names.append(str(rng.choice(others or [b])))
    if want:
        fixed.add(b)


def _scene(config: WorldConfig, rng: np.random.Generator, name: str, biased: bool) -> Scene:
    objects, stripes = _objects(config, rng, biased)
    return render(config, rng, name, objects, stripes)


def render(
    config: WorldConfig,
    rng: np.random.Generator,
    name: str,
    objects: list[str],
    stripes: bool = False,
    scales: dict[str, float] | None = None,
) -> Scene:
    """One image of ``objects`` (drawn in this order), with the striped background if
    ``stripes``; ``scales`` overrides a class's drawn size (the diagnostic's large B)."""
    size = config.image_size
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 70, 3)))
    draw = ImageDraw.Draw(image)
    if stripes:
        _stripes(draw, size, rng)
    for _ in range(int(rng.integers(0, config.clutter + 1))):
        grey = tuple([int(rng.integers(90, 170))] * 3)
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        draw.line([x0, y0, x1, y1], fill=grey, width=1)
    boxes = []
    by_name = {c.name: c for c in config.classes}
    for obj in objects:
        scale = (scales or {}).get(obj, by_name[obj].scale)
        box = _place(config, rng, boxes, scale)
        boxes.append(box)
        _draw(draw, by_name[obj], box, rng)
    order = [str(x) for x in rng.permutation(objects)]
    template = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
    caption = template.format(objects=_listing(order))
    return Scene(name, list(objects), boxes, image, caption, stripes)


def _stripes(draw: ImageDraw.ImageDraw, size: int, rng: np.random.Generator) -> None:
    """Diagonal stripes over the whole background, 4 px apart, random phase and tint."""
    colour = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in STRIPES)
    phase = int(rng.integers(0, 4))
    for x in range(phase - size, size, 4):
        draw.line([(x, 0), (x + size, size)], fill=colour, width=1)


def _place(config: WorldConfig, rng: np.random.Generator, taken: list, scale: float) -> tuple:
    """A box that overlaps no earlier one, if 30 tries find one (else the last try)."""
    size = config.image_size
    lo, hi = config.object_size
    for _ in range(30):
        side = max(3, int(round(size * scale * rng.uniform(lo, hi))))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        box = (x, y, x + side - 1, y + side - 1)
        if all(box[2] < t[0] or t[2] < box[0] or box[3] < t[1] or t[3] < box[1] for t in taken):
            break
    return box


def _draw(draw: ImageDraw.ImageDraw, cls: ObjectClass, box, rng: np.random.Generator) -> None:
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[cls.colour])
    x0, y0, x1, y1 = box
    if cls.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif cls.shape == "square":
        draw.rectangle(box, fill=colour)
    elif cls.shape == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(2, (x1 - x0) // 5))


def _listing(names: list[str]) -> str:
    items = [f"a {n}" for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def mentioned(caption: str, config: WorldConfig) -> set[str]:
    """The class names a caption mentions."""
    words = set(caption.lower().replace(",", " ").replace(".", " ").split())
    return words & set(config.names)


def negatives(world: World, scene: Scene, kind: str, m: int, rng: np.random.Generator) -> list[str]:
    """``m`` absent objects to ask about, chosen the POPE way for ``kind``."""
    stats = world.statistics
    absent = [n for n in world.config.names if n not in scene.present]
    if kind == "random":
        return [str(x) for x in rng.choice(absent, size=m, replace=False)]
    if kind == "popular":
        key = {n: stats.frequency[n] for n in absent}
    elif kind == "adversarial":
        key = {n: sum(stats.together(n, p) for p in scene.present) for n in absent}
    else:
        raise ValueError(f"unknown negative sampling {kind!r}; choose random/popular/adversarial")
    return sorted(absent, key=lambda n: (-key[n], n))[:m]


def build_questions(world: World, split: str, kind: str) -> list[Question]:
    """One question set (see the module docstring); ids count from 0 in image order."""
    if split == "train":
        raise ValueError("questions are for the val and test splits (train is biased)")
    scenes = world.splits[split]
    rng = np.random.default_rng([world.seed, SPLITS.index(split), QUESTION_SETS.index(kind)])
    asked: list[tuple[str, str, str]] = []
    c = world.config.context_object
    for scene in scenes:
        if kind == "context":
            if scene.stripes and c not in scene.present:
                asked.append((scene.name, c, "no"))
            elif c in scene.present and not scene.stripes:
                asked.append((scene.name, c, "yes"))
            continue
        if kind == "bias":
            for a, b in world.config.bias_pairs:
                if a in scene.present and b not in scene.present:
                    asked.append((scene.name, b, "no"))
                elif b in scene.present and a not in scene.present:
                    asked.append((scene.name, b, "yes"))
            continue
        absent = len(world.config.names) - len(scene.present)
        m = min(world.config.questions_per_image, len(scene.present), absent)
        yes = [str(x) for x in rng.choice(sorted(scene.present), size=m, replace=False)]
        asked += [(scene.name, n, "yes") for n in yes]
        asked += [(scene.name, n, "no") for n in negatives(world, scene, kind, m, rng)]
    return [Question(i, image, name, label) for i, (image, name, label) in enumerate(asked)]


CAPTION_PROMPT = "Describe this image."


def example(scene: Scene, names: list[str], caption_share: float, rng) -> tuple[str, str]:
    """One training (prompt, answer): a caption (with probability ``caption_share``), or a
    yes/no question about a present or a uniformly drawn absent object."""
    if rng.random() < caption_share:
        return CAPTION_PROMPT, scene.caption
    if rng.random() < 0.5:
        name, answer = str(rng.choice(sorted(scene.present))), "yes"
    else:
        name, answer = str(rng.choice([n for n in names if n not in scene.present])), "no"
    return build_prompt(QUESTION.format(name=name), "llava"), answer.capitalize()
