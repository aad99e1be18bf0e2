"""The README's demo: a planted hallucination, and what the guard does about it.

:func:`run_demo` trains a small LLaVA of the hallucination lab (:mod:`.testbed`) with LLaVA's
staged recipe on a generated world with two planted causes (a named co-occurrence, and an
unnamed striped background), cached by a hash of everything that decides its weights; trains
its projector VL-SAE with the project's pipeline; and runs the ordinary POPE A/B harness
(``none`` against the guard) on the world's test questions, including the two sets where each
cause is broken. The lab's full experiment is ``benchmarks/testbed.py``.

Also here: the random-weight helpers tests and benchmarks build inputs with
(:func:`make_scenes`, :func:`fit_sae`: a VL-SAE fitted in closed form to any model).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import Field
from torch import Tensor

from ..backends import detect
from ..core.intervention import GuardConfig
from ..core.sae import VLSAE
from ..core.sae_config import SAEConfig, Source
from ..harness import pope as pope_harness
from ..harness.config import PopeRunConfig, RunConfig
from ..validation import Settings
from .testbed.evaluation import cause_scores
from .testbed.experiment import ExperimentConfig, train_saes
from .testbed.model import trained_model
from .testbed.world import build_world

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}


@dataclass
class Scene:
    image: Image.Image
    objects: list[tuple[str, str]]  # (colour, shape)

    @property
    def caption(self) -> str:
        return "A picture of " + " and ".join(f"a {c} {s}" for c, s in self.objects) + "."


def make_scenes(n: int, seed: int, size: int = 56) -> list[Scene]:
    """Images with one or two coloured shapes at random places, with their ground truth."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 90, 3)))
        draw = ImageDraw.Draw(img)
        objects = []
        for shape in rng.choice(SHAPES, size=int(rng.integers(1, 3)), replace=False):
            colour = str(rng.choice(list(COLOURS)))
            x, y = (int(v) for v in rng.integers(0, size // 2, 2))
            box = [x, y, x + size // 2, y + size // 2]
            if shape == "triangle":
                draw.polygon(
                    [(x, box[3]), ((x + box[2]) // 2, y), (box[2], box[3])], fill=COLOURS[colour]
                )
            else:
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
            objects.append((colour, str(shape)))
        scenes.append(Scene(img, objects))
    return scenes


@torch.no_grad()
def fit_sae(model, processor, scenes: list[Scene], n_concepts: int, k: int, seed: int) -> VLSAE:
    """A VL-SAE for this model in closed form (see the module docstring)."""
    backend = detect(model)
    rows: list[Tensor] = []
    hook = backend.projector().register_forward_hook(
        lambda m, a, out: rows.append(out.reshape(-1, out.shape[-1]))
    )
    try:
        prompts = [f"USER: <image>\n{s.caption} ASSISTANT:" for s in scenes]
        model(
            **processor(
                images=[s.image for s in scenes], text=prompts, return_tensors="pt", padding=True
            )
        )
    finally:
        hook.remove()
    vision = torch.cat(rows).float()
    ids = processor.tokenizer([s.caption for s in scenes], add_special_tokens=False).input_ids
    text = backend.embed(torch.tensor(sorted({t for seq in ids for t in seq}))).float()

    gen = torch.Generator().manual_seed(seed)
    half = n_concepts // 2
    pick_v = torch.randperm(len(vision), generator=gen)[:half]
    pick_t = torch.randint(len(text), (n_concepts - half,), generator=gen)
    config = SAEConfig(
        d_in=vision.shape[1],
        n_concepts=n_concepts,
        k=k,
        source=Source(model_id="vlsae-guard demo tiny LLaVA", site="projector"),
    )
    sae = VLSAE(config).eval()
    sae.encoder.copy_(torch.cat([vision[pick_v], text[pick_t]]))
    stats = {}
    for modality, x in (("vision", vision), ("text", text)):
        z = sae.encode(x, modality)
        zc, xc = z - z.mean(0), x - x.mean(0)
        ridge = 1e-3 * torch.eye(n_concepts) * zc.pow(2).sum() / n_concepts
        weight = torch.linalg.solve(zc.T @ zc + ridge, zc.T @ xc)
        decoder = sae.decoder_for(modality)
        decoder.weight.copy_(weight)
        decoder.bias.copy_(x.mean(0) - z.mean(0) @ weight)
        residual = (sae.decode(z, modality) - x).pow(2).sum() / xc.pow(2).sum()
        stats[f"explained_variance_{modality}"] = float(1 - residual)
    fires_v = (sae.encode(vision) > 0).float().mean(0) >= 0.01
    fires_t = (sae.encode(text, "text") > 0).float().mean(0) >= 0.01
    shared = torch.nonzero(fires_v & fires_t).flatten().tolist()
    return sae.with_config(shared_concepts=shared, stats=stats)


# --- the demo run: a lab model through the ordinary POPE A/B ---------------------------------

DEMO_NOTE = (
    "NOTE: a small LLaVA trained here in a minute on a generated world where hallucination is "
    "planted on purpose; what it shows is how the guard acts on those two causes, not how it "
    "acts on real LLaVA models (benchmarks/testbed.py runs every method over seeds)."
)


class DemoConfig(Settings):
    """The demo (``benchmarks/pope.py --demo``, ``vlsae-guard demo``): the lab's demo
    configuration (``lab``); of a run's settings only these are the caller's."""

    out: Path = Path("runs/demo")
    cache: Path | None = None  # trained models; None: OUT/cache
    n_images: int | None = Field(default=None, ge=1)  # test images; None: the lab config's
    seed: int = RunConfig.model_fields["seed"].default
    batch_size: int = Field(default=RunConfig.model_fields["batch_size"].default, ge=1)
    limit: int | None = Field(default=None, ge=1)
    bootstrap: int = RunConfig.model_fields["bootstrap"].default
    # cue masking: the guard that lowers the lab's co-occurrence cause (docs/testbed.md)
    guard: GuardConfig = GuardConfig(mode="cue-mask")
    lab: ExperimentConfig = Field(default_factory=lambda: ExperimentConfig.demo())


def run_demo(config: DemoConfig, progress: bool = True, log=None) -> tuple[dict, str]:
    """Train (or load) the lab model and its VL-SAE under ``config.out`` and run the ordinary
    A/B on the world's test questions; returns the results and the text to print."""
    out, lab = config.out, config.lab
    log = log or ((lambda msg: print(msg, file=sys.stderr)) if progress else (lambda *_: None))
    started = time.perf_counter()
    world = build_world(lab.world, config.seed)
    if config.n_images is not None:  # fewer test images; the training split (and model) as is
        world = dataclasses.replace(
            world, splits={**world.splits, "test": world.splits["test"][: config.n_images]}
        )
    files = world.write("test", out / "inputs" / "test")
    log("demo: the lab model (LLaVA's staged recipe; cached after the first run)")
    model = trained_model(
        world, lab.model, lab.training, config.cache or out / "cache", log, lab.recipe
    )
    log("demo: its projector VL-SAE (collect + train)")
    saes, _ = train_saes(world, model.path, lab, out / "inputs" / "sae")
    sets, causes = world.config.question_sets, world.config.causes
    demo_run = PopeRunConfig(
        model=str(model.path),
        backend="hf",
        prompt_format="chat-template",
        sae=str(saes["projector"]),
        guard=config.guard,
        ab=True,
        images=files["images"],
        questions=[str(files[kind]) for kind in sets],
        out=out,
        batch_size=config.batch_size,
        seed=config.seed,
        max_new_tokens=3,
        dtype="float32",
        device="cpu",
        bootstrap=config.bootstrap,
        limit=config.limit,
    )
    results = pope_harness.run(demo_run, progress)
    off, on = results["arms"]
    scores = {c: cause_scores(out / "paired" / f"{q}.jsonl", off, on) for c, q in causes.items()}
    results["demo"] = {
        "lab": lab.model_dump(mode="json"),
        "model": {"path": str(model.path), "sha256": model.sha256, "cached": model.cached},
        "causes": scores,
        "seconds": round(time.perf_counter() - started, 1),
    }
    header = (
        f"vlsae-guard POPE demo: a lab LLaVA ({lab.recipe.kind} recipe, {lab.world.n_train} "
        f"training images, {'cached' if model.cached else 'trained now'}), "
        f"{len(world.splits['test'])} test images\n"
        + "\n".join(_cause_line(c, s, lab) for c, s in scores.items())
        + f"\nguard: {_describe(config.guard)}"
    )
    table = pope_harness.finish(results, out, "POPE demo (lab model)", [DEMO_NOTE])
    warnings = "".join(f"WARNING: {w}\n\n" for w in results["warnings"])
    text = (
        f"{header}\n\n{table}\n\n{pope_harness.NOTES}\n\n{DEMO_NOTE}\n\n{warnings}"
        f"wrote {out / 'results.json'}, results.md, results.png and answers/ in {out}"
    )
    return results, text


def _describe(guard: GuardConfig) -> str:
    if guard.mode == "cue-mask":
        return (
            f"cue-mask, recall_floor={guard.recall_floor}, token_share={guard.token_share}, "
            f"fill={guard.fill} (the asked object's cues masked in the image tokens)"
        )
    if guard.mode == "paper":
        return f"paper mode, layer {guard.layer}, alpha={guard.alpha}"
    return f"{guard.rewrite}, alpha={guard.alpha}"


def _cause_line(cause: str, s: dict, lab: ExperimentConfig) -> str:
    what = {
        "cooccurrence": "named co-occurrence "
        + ", ".join(f"{a} -> {b}" for a, b in lab.world.bias_pairs),
        "context": f"unnamed context stripes -> {lab.world.context_object}",
    }[cause]
    return (
        f"planted {what}: hallucination {s['off']:.0f}% -> {s['on']:.0f}% with the guard "
        f"(n={s['n']}, McNemar p={s['mcnemar_p']:.3g}); recall where B is present without "
        f"its cue {s['recall_off']:.0f}% -> {s['recall_on']:.0f}% (n={s['n_yes']})"
    )
