"""The demo's inputs, built offline from a seed: a tiny LLaVA, images, questions, a VL-SAE.

:func:`prepare` writes what a real POPE run reads, in the same formats: a random-weight LLaVA
in the llava-hf layout, PNG images of coloured shapes, a POPE question file (JSON lines) about
them, and a small VL-SAE checkpoint *fitted* to that model: concept directions sampled from its
own projector outputs and caption-token embeddings, decoders solved by ridge least squares,
shared concepts = those that fire for both modalities. ``benchmarks/pope.py --demo`` then runs
the ordinary A/B harness on them.

The model has random weights: the numbers show the machinery works, not that the guard helps.
"""

from __future__ import annotations

import json
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
from . import tiny

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


def questions(scenes: list[Scene]) -> list[dict]:
    """One POPE-style question per (image, shape): "yes" if the shape is in the image."""
    return [
        {
            "question_id": len(scenes) * j + i,
            "image": i,
            "text": f"Is there a {shape} in the image?",
            "label": "yes" if any(s == shape for _, s in scene.objects) else "no",
        }
        for j, shape in enumerate(SHAPES)
        for i, scene in enumerate(scenes)
    ]


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


@dataclass(frozen=True)
class DemoFiles:
    model: Path
    sae: Path
    images: Path
    questions: Path
    sae_summary: dict


def prepare(directory: str | Path, n_images: int = 24, seed: int = 0) -> DemoFiles:
    """Write the tiny model, the fitted VL-SAE, the images and the questions (deterministic)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    directory = Path(directory)
    model_dir = tiny.build_hf_llava(directory / "model", seed=seed)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    scenes = make_scenes(n_images, seed)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = [f"scene_{i:03d}.png" for i in range(len(scenes))]
    for scene, name in zip(scenes, names, strict=True):
        scene.image.save(images / name)
    with torch.random.fork_rng(devices=[]):
        sae = fit_sae(model, processor, scenes, n_concepts=128, k=8, seed=seed)
    sae_dir = directory / "sae"
    sae.save_pretrained(sae_dir)
    questions_file = directory / "pope_shapes.jsonl"
    with open(questions_file, "w") as f:
        for q in questions(scenes):
            f.write(json.dumps({**q, "image": names[q["image"]]}) + "\n")
    summary = {
        "n_concepts": sae.config.n_concepts,
        "k": sae.config.k,
        "shared": len(sae.config.shared_concepts or []),
        **sae.config.stats,
    }
    return DemoFiles(model_dir, sae_dir, images, questions_file, summary)


# --- the demo run: these inputs through the ordinary POPE A/B -------------------------------

DEMO_NOTE = (
    "NOTE: a tiny random-weight model built here; these numbers say nothing about real LLaVA "
    "models or about whether the guard reduces hallucination. They show that the A/B pipeline "
    "runs end to end."
)


class DemoConfig(Settings):
    """The demo (``benchmarks/pope.py --demo``, ``vlsae-guard demo``): its own tiny model and
    data; of a run's settings only these are the caller's."""

    out: Path = Path("runs/demo")
    n_images: int = Field(default=24, ge=1)  # generated images, one question per shape each
    seed: int = RunConfig.model_fields["seed"].default
    batch_size: int = Field(default=RunConfig.model_fields["batch_size"].default, ge=1)
    limit: int | None = Field(default=None, ge=1)
    bootstrap: int = RunConfig.model_fields["bootstrap"].default
    guard: GuardConfig = GuardConfig()


def run_demo(config: DemoConfig, progress: bool = True) -> tuple[dict, str]:
    """Build the demo's inputs under ``config.out`` and run the ordinary A/B on them; returns
    the results and the text to print. Model, data and decoding are the demo's own."""
    out = config.out
    files = prepare(out / "inputs", n_images=config.n_images, seed=config.seed)
    demo_run = PopeRunConfig(
        model=str(files.model),
        backend="hf",
        sae=str(files.sae),
        guard=config.guard,
        ab=True,
        images=files.images,
        questions=[str(files.questions)],
        out=out,
        batch_size=config.batch_size,
        seed=config.seed,
        max_new_tokens=8,
        dtype="float32",
        device="cpu",
        bootstrap=config.bootstrap,
        limit=config.limit,
    )
    started = time.perf_counter()
    results = pope_harness.run(demo_run, progress)
    results["demo"] = {"sae": files.sae_summary, "seconds": round(time.perf_counter() - started, 1)}
    sae = files.sae_summary
    asked = pope_harness.question_sets(demo_run)[0].questions
    header = (
        f"vlsae-guard POPE demo: tiny random-weight LLaVA (hf backend), {len(asked)} POPE-style "
        f"questions about {len({q.image for q in asked})} generated images\n"
        f"VL-SAE fitted to it: {sae['n_concepts']} concepts, "
        f"k={sae['k']}, {sae['shared']} shared; explained variance vision "
        f"{sae['explained_variance_vision']:.2f}, text {sae['explained_variance_text']:.2f}\n"
        f"guard: {results['settings']['guard']['rewrite']}, "
        f"alpha={results['settings']['guard']['alpha']}"
    )
    table = pope_harness.finish(results, out, "POPE demo (tiny random model)", [DEMO_NOTE])
    warnings = "".join(f"WARNING: {w}\n\n" for w in results["warnings"])
    text = (
        f"{header}\n\n{table}\n\n{pope_harness.NOTES}\n\n{DEMO_NOTE}\n\n{warnings}"
        f"wrote {out / 'results.json'}, results.md, results.png and answers/ in {out}"
    )
    return results, text
