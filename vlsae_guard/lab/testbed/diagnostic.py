"""Where a planted hallucination comes from, read off the model's own answer probabilities.

For each planted cause (a bias pair A -> B; the stripes -> C) the diagnostic asks "Is there a
B in the image?" in the harness's exact prompt on fresh images of five kinds and reports the
mean P("Yes") (the first answer token, normalised over "Yes" and "No"):

- ``cue_only``: the cue (A, or the stripes) without B: the hallucination itself;
- ``neither``: neither the cue nor B: the model's base rate for B;
- ``no_image``: the question with no image at all: the language prior alone;
- ``b_small``: B present at its class's size, no cue; ``b_large``: B drawn at full size.

What it predicts: a method that contrasts the image against a no-image arm (M3ID, PAI's
guidance) adds ``w * (logit(image) - logit(no image))`` to the answer's log-odds.
``no_image_contrast`` is that difference on the cue-only images, logit(``cue_only``) -
logit(``no_image``): positive where the cue lives in the image (the stripes, or an A the model
reads as B), so the contrast pushes "yes" *up* and raises the hallucination; negative where the
language alone says "yes" (the prior in the text), so the contrast cancels it. If ``cue_only``
is near ``b_small``, the model cannot tell the cue from the evidence.
"""

from __future__ import annotations

import numpy as np
import torch

from ...scoring.pope import build_prompt
from .world import QUESTION, World, render

CONDITIONS = ("cue_only", "neither", "no_image", "b_small", "b_large")
DIAGNOSTIC_SEED = 2000  # fresh images: stream [seed, DIAGNOSTIC_SEED, cause index]


def cues(world: World) -> list[dict]:
    """The planted causes as (cause, cue, object): one per bias pair, one for the stripes."""
    out = [{"cause": "cooccurrence", "cue": a, "object": b} for a, b in world.config.bias_pairs]
    if (c := world.config.context_object) is not None:
        out.append({"cause": "context", "cue": "stripes", "object": c})
    return out


def scenes(world: World, cue: str, b: str, condition: str, n: int, rng) -> list:
    """``n`` images for one condition: 1-2 objects that belong to no cause, plus the cue and B
    as the condition says."""
    config = world.config
    planted = config.paired | {config.context_object}
    neutral = [x for x in config.names if x not in planted]
    out = []
    for i in range(n):
        k = min(len(neutral), int(rng.integers(1, 3)))
        objects = [str(x) for x in rng.choice(neutral, size=k, replace=False)] if k else []
        stripes = cue == "stripes" and condition == "cue_only"
        if condition == "cue_only" and cue != "stripes":
            objects.append(cue)
        if condition in ("b_small", "b_large"):
            objects.append(b)
        scales = {b: 1.0} if condition == "b_large" else None
        out.append(render(config, rng, f"{condition}_{i}.png", objects, stripes, scales))
    return out


@torch.inference_mode()
def p_yes(model, processor, question: str, images: list | None) -> list[float]:
    """P("Yes") against "No" for the first answer token, per image (``None``: no image)."""
    tok = processor.tokenizer
    yes, no = (tok(" " + w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    prompt = build_prompt(question, "llava")
    content = [{"type": "text", "text": prompt}]
    if images is not None:
        content.insert(0, {"type": "image"})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    if images is None:
        inputs = processor(text=[text], return_tensors="pt")
    else:
        inputs = processor(text=[text] * len(images), images=images, return_tensors="pt")
    logits = model(**inputs).logits[:, -1, [yes, no]].float()
    return logits.softmax(-1)[:, 0].tolist()


def _load(model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    return LlavaForConditionalGeneration.from_pretrained(model_dir).eval(), processor


def planting(model_dir, world: World, split: str = "val", batch_size: int = 64) -> dict:
    """How strongly the model learned each cause, on ``split``'s question sets: accuracy, the
    share of "yes" on "no" questions (on a cause's set: its hallucination rate) and on "yes"
    questions (recall), percent. An answer is "yes" where P("Yes") > P("No") for the first
    token, as greedy decoding's first token decides between the two. For choosing a world's
    settings on validation before any test run (``benchmarks/testbed_plant.py``)."""
    model, processor = _load(model_dir)
    scenes = {s.name: s.image for s in world.splits[split]}
    out = {}
    for kind, questions in world.questions(split).items():
        prob: dict[int, float] = {}
        for text in sorted({q.text for q in questions}):  # one question, many images per call
            asked = [q for q in questions if q.text == text]
            for start in range(0, len(asked), batch_size):
                chunk = asked[start : start + batch_size]
                probs = p_yes(model, processor, text, [scenes[q.image] for q in chunk])
                prob.update(zip((q.question_id for q in chunk), probs, strict=True))
        says = [prob[q.question_id] > 0.5 for q in questions]
        labels = [q.label == "yes" for q in questions]
        yes = [s for s, y in zip(says, labels, strict=True) if y]
        no = [s for s, y in zip(says, labels, strict=True) if not y]
        out[kind] = {
            "n": len(questions),
            "accuracy": 100 * float(np.mean([s == y for s, y in zip(says, labels, strict=True)])),
            "yes_on_no": 100 * float(np.mean(no)) if no else None,
            "recall": 100 * float(np.mean(yes)) if yes else None,
        }
    return out


def diagnose(model_dir, world: World, n: int = 64) -> list[dict]:
    """One row per planted cause: mean P("Yes") under each condition (see the module)."""
    model, processor = _load(model_dir)
    rows = []
    for index, cause in enumerate(cues(world)):
        rng = np.random.default_rng([world.seed, DIAGNOSTIC_SEED, index])
        question = QUESTION.format(name=cause["object"])
        row = {**cause, "n": n}
        for condition in CONDITIONS:
            if condition == "no_image":
                probs = p_yes(model, processor, question, None)
            else:
                images = [
                    s.image for s in scenes(world, cause["cue"], cause["object"], condition, n, rng)
                ]
                probs = p_yes(model, processor, question, images)
            row[condition] = round(float(np.mean(probs)), 4)
        row["no_image_contrast"] = round(_logit(row["cue_only"]) - _logit(row["no_image"]), 3)
        rows.append(row)
    return rows


def _logit(p: float, eps: float = 1e-4) -> float:
    p = min(max(p, eps), 1 - eps)
    return float(np.log(p / (1 - p)))


def lines(per_seed: list[dict]) -> str:
    """Markdown rows: seed, cause, cue -> object, then P("Yes") under each condition."""
    out = [
        "| seed | cause | cue -> object | "
        + " | ".join(f"P(yes) {c.replace('_', ' ')}" for c in CONDITIONS)
        + " | no-image contrast (log-odds) |",
        "|---|---|---|" + "---|" * (len(CONDITIONS) + 1),
    ]
    for s in per_seed:
        for r in s["diagnostic"]:
            cells = " | ".join(f"{r[c]:.2f}" for c in CONDITIONS)
            out.append(
                f"| {s['seed']} | {r['cause']} | {r['cue']} -> {r['object']} | {cells} | "
                f"{r['no_image_contrast']:+.1f} |"
            )
    return "\n".join(out)
