"""An A/B run of the guard end to end on a tiny LLaVA this package builds itself (offline).

Builds a random-weight LLaVA in the llava-hf layout, generated images of coloured shapes with
POPE-style questions about them, and a small VL-SAE *fitted* to that model: concept directions
sampled from its own projector outputs and caption-token embeddings, decoders solved by ridge
least squares, shared concepts = those that fire for both modalities. Then the same questions
are answered with the guard off and on, and scored like POPE.

The model has random weights: the numbers show the machinery works, not that the guard helps.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from . import tiny
from .backends import detect
from .config import SAEConfig, Source
from .guard import guard
from .sae import VLSAE
from .scoring import pope

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
DISCLAIMER = (
    "NOTE: a tiny random-weight model; these numbers say nothing about real LLaVA models or "
    "about whether the guard reduces hallucination. They show the A/B pipeline runs end to end."
)


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


@torch.no_grad()
def answer(model, processor, scenes, items, batch_size: int, max_new_tokens: int = 3):
    """Greedy answers, batched with left padding."""
    processor.tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        prompts = [f"USER: <image>\n{pope.build_prompt(q['text'])} ASSISTANT:" for q in batch]
        inputs = processor(
            images=[scenes[q["image"]].image for q in batch],
            text=prompts,
            return_tensors="pt",
            padding=True,
        )
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.tokenizer.batch_decode(
            ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        out.extend(t.strip() for t in texts)
    return out


def run(
    n_images: int = 24,
    seed: int = 0,
    alpha: float = 0.5,
    method: str = "replace",
    batch_size: int = 8,
    out: Path | None = None,
) -> dict:
    """Build everything, answer with the guard off (A) and on (B), score, and report."""
    import transformers
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        directory = tiny.build_hf_llava(Path(tmp) / "model", seed=seed)
        model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
        processor = AutoProcessor.from_pretrained(directory)
    scenes = make_scenes(n_images, seed)
    items = questions(scenes)
    sae = fit_sae(model, processor, scenes, n_concepts=128, k=8, seed=seed)
    with guard(model, sae, alpha=alpha, method=method) as handle:
        with handle.disabled():
            text_a = answer(model, processor, scenes, items, batch_size)
        text_b = answer(model, processor, scenes, items, batch_size)
    labels = [q["label"] for q in items]
    result = pope.compare(
        [pope.parse_answer(t) for t in text_a], [pope.parse_answer(t) for t in text_b], labels
    )
    result["raw_answers_changed"] = sum(a != b for a, b in zip(text_a, text_b, strict=True))
    result["settings"] = {
        "backend": "hf",
        "model": "tiny random LLaVA (vlsae_guard.tiny, hub layout)",
        "seed": seed,
        "images": n_images,
        "questions": len(items),
        "guard": handle.config.model_dump(),
        "sae": {
            "n_concepts": 128,
            "k": 8,
            "shared": len(sae.config.shared_concepts),
            **sae.config.stats,
        },
        "prompt": pope.PROMPTS["llava"],
        "parser": "llava/pope (first sentence, negation words)",
        "decoding": "greedy, max_new_tokens=3",
        "batch_size": batch_size,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        with open(out / "answers.jsonl", "w") as f:
            for q, a, b in zip(items, text_a, text_b, strict=True):
                f.write(json.dumps({**q, "answer_off": a, "answer_on": b}) + "\n")
    return result


def format_table(result: dict) -> str:
    rows = [f"{'metric':<10} {'guard off':>10} {'guard on':>10} {'delta':>8}"]
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        rows.append(
            f"{key:<10} {result['a'][key]:>10.1f} {result['b'][key]:>10.1f} "
            f"{result['delta'][key]:>+8.1f}"
        )
    rows.append(
        f"{result['n']} questions, {result['flips']} answers changed, exact McNemar "
        f"p = {result['mcnemar_p']:.3g}"
    )
    return "\n".join(rows)
