"""LLaVA's training recipe on the testbed world, in stages (issue 16).

(a) CLIP-style contrastive pre-training of the vision tower with a small text encoder on the
world's image-caption pairs (soft targets: captions naming the same set of objects are all
positives); (optionally) a text-only warm-up of the language model on the captions; (b) tower
(and language model) frozen, projector trained on captioning; (c) instruction tuning of the
projector and the language model on the same caption + yes/no mix as the scratch recipe
(:class:`~.model.TrainingConfig`), tower frozen.

With the tower frozen after (a), its features at LLaVA's layer (``vision_feature_layer``) are
computed once and fed through the projector into the image-token positions of the input
embeddings: the same computation as ``LlavaForConditionalGeneration`` with ``pixel_values``,
without the tower's repeated forward pass. The text encoder exists only for (a) and for the
zero-shot metric; the checkpoint holds the usual LLaVA weights.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ...pipeline.train import warmup_cosine
from ...validation import FrozenSettings
from .. import tiny
from .world import CAPTION_PROMPT, Scene, World, example

ZERO_SHOT_PROMPT = "A picture of a {name}."


class RecipeConfig(FrozenSettings):
    """How the model is trained: ``llava`` (the staged recipe above, the default; stage (c)
    takes its steps, batch, lr and caption share from :class:`~.model.TrainingConfig`) or
    ``scratch`` (one QA + captioning loop from random weights: the recipe of the tables
    docs/testbed.md keeps as history, bit-identical to before recipes existed, same cache
    keys)."""

    kind: Literal["scratch", "llava"] = "llava"
    # (a) contrastive pre-training of the tower
    clip_steps: int = Field(default=600, ge=1)
    clip_batch_size: int = Field(default=128, ge=2)
    clip_lr: float = Field(default=1e-3, gt=0)
    clip_dim: int = Field(default=64, ge=8)  # shared embedding size
    text_encoder_hidden: int = Field(default=64, ge=8)
    text_encoder_layers: int = Field(default=2, ge=1)
    text_encoder_heads: int = Field(default=2, ge=1)
    # optional: the language model on caption text alone (0: off)
    lm_warmup_steps: int = Field(default=300, ge=0)
    lm_warmup_lr: float = Field(default=1.5e-3, gt=0)
    # (b) projector on captioning (0: skip)
    projector_steps: int = Field(default=300, ge=0)
    projector_lr: float = Field(default=2e-3, gt=0)


class TextEncoder(nn.Module):
    """A small transformer over the tiny tokenizer's ids; mean-pooled, projected, unit norm."""

    def __init__(self, vocab: int, config: RecipeConfig, max_len: int = 64):
        super().__init__()
        h = config.text_encoder_hidden
        self.embed = nn.Embedding(vocab, h)
        self.pos = nn.Parameter(torch.randn(max_len, h) * 0.02)
        layer = nn.TransformerEncoderLayer(
            h, config.text_encoder_heads, 2 * h, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, config.text_encoder_layers, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(h)
        self.proj = nn.Linear(h, config.clip_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=~mask)
        x = self.norm(x) * mask[..., None]
        return F.normalize(self.proj(x.sum(1) / mask.sum(1, keepdim=True)), dim=-1)


class ClipHead(nn.Module):
    """The vision side of (a): the tower's pooled output, projected, unit norm."""

    def __init__(self, tower: nn.Module, hidden: int, dim: int):
        super().__init__()
        self.tower = tower
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.tower(pixels).pooler_output), dim=-1)


def _text_ids(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return ids, mask


def _optimise(params, steps, lr, config, loss_of_step, log, stage: str) -> list[dict]:
    """AdamW with warm-up + cosine, clipped gradients; the loss curve at ten points."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, config.warmup))
    curve, window, every = [], [], max(1, steps // 10)
    for step in range(steps):
        loss = loss_of_step(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": round(float(np.mean(window)), 4)})
            log(f"  {stage} step {step + 1}/{steps}: loss {curve[-1]['loss']:.3f}")
            window = []
    return curve


def contrastive(model, pixels, test_pixels, tokenizer, world: World, recipe, training, log) -> dict:
    """Stage (a): the tower and a text encoder, CLIP loss with same-object-set positives.

    ``pixels``: the training split's; returns the loss curve and the zero-shot accuracy on the
    test split (``test_pixels``)."""
    scenes = world.splits["train"]
    tower = model.model.vision_tower
    head = ClipHead(tower, tower.config.hidden_size, recipe.clip_dim)
    text = TextEncoder(len(tokenizer), recipe)
    captions = _text_ids(tokenizer, [s.caption for s in scenes])
    sets = [frozenset(s.present) for s in scenes]
    rng = np.random.default_rng([world.seed, 8])
    n = min(recipe.clip_batch_size, len(scenes))

    def loss_of_step(_step: int) -> torch.Tensor:
        pick = rng.choice(len(scenes), n, replace=False)
        image = head(pixels[torch.from_numpy(pick)])
        ids, mask = captions[0][pick], captions[1][pick]
        width = int(mask.sum(1).max())
        caption = text(ids[:, :width], mask[:, :width])
        logits = head.logit_scale.clamp(max=math.log(100)).exp() * image @ caption.T
        same = torch.tensor([[sets[i] == sets[j] for j in pick] for i in pick], dtype=logits.dtype)
        target = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2

    params = [*head.parameters(), *text.parameters()]
    curve = _optimise(
        params, recipe.clip_steps, recipe.clip_lr, training, loss_of_step, log, "clip"
    )
    return {"loss": curve, "zero_shot": zero_shot(head, text, tokenizer, world, test_pixels)}


@torch.no_grad()
def zero_shot(head: ClipHead, text: TextEncoder, tokenizer, world: World, pixels) -> dict:
    """Zero-shot object accuracy of the tower on the test split: each class name in the prompt
    ``"A picture of a {name}."`` through the text encoder, each image through the tower.

    ``top1``: share of images whose best-matching class is present (chance: objects per image
    over classes); ``recall``: share of the present objects among the image's n best classes
    (n = objects present); ``single``: top-1 on the images with exactly one object."""
    head.eval(), text.eval()
    names = world.config.names
    classes = text(*_text_ids(tokenizer, [ZERO_SHOT_PROMPT.format(name=n) for n in names]))
    scenes = world.splits["test"]
    scores = head(pixels) @ classes.T
    order = scores.argsort(1, descending=True).tolist()
    top1 = [names[o[0]] in s.present for o, s in zip(order, scenes, strict=True)]
    hits = [
        len({names[i] for i in o[: len(s.present)]} & s.present) / len(s.present)
        for o, s in zip(order, scenes, strict=True)
    ]
    single = [t for t, s in zip(top1, scenes, strict=True) if len(s.present) == 1]
    head.train(), text.train()
    return {
        "top1": float(np.mean(top1)),
        "recall": float(np.mean(hits)),
        "single": float(np.mean(single)) if single else None,
        "n": len(scenes),
        "chance_top1": float(np.mean([len(s.present) for s in scenes]) / len(names)),
    }


@torch.no_grad()
def tower_features(model, pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The frozen tower's features at LLaVA's layer, CLS dropped (N x patches x hidden)."""
    layer = model.config.vision_feature_layer
    out = []
    for start in range(0, len(pixels), chunk):
        states = model.model.vision_tower(pixels[start : start + chunk], output_hidden_states=True)
        out.append(states.hidden_states[layer][:, 1:])
    return torch.cat(out)


def embedded_loss(model, features: torch.Tensor, batch: dict, image_token: int) -> torch.Tensor:
    """LLaVA's loss with ``features`` (tower output) through the projector in place of the
    image tokens: what ``model(pixel_values=...)`` computes, given the tower's output."""
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    projected = model.model.multi_modal_projector(features).to(embeds.dtype)
    where = (ids == image_token).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(where, projected.reshape(-1, embeds.shape[-1]))
    return model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss


def lm_warmup(model, scenes: list[Scene], tokenizer, world, recipe, training, log) -> list:
    """The language model on caption text alone (no image): it learns the captions' language."""
    rng = np.random.default_rng([world.seed, 9])
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def loss_of_step(_step: int) -> torch.Tensor:
        pick = rng.integers(0, len(scenes), training.batch_size)
        rows = [
            [bos, *tokenizer(scenes[i].caption, add_special_tokens=False).input_ids, eos]
            for i in pick
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
        mask = (labels != -100).long()
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    lm = [p for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n]
    return _optimise(
        lm, recipe.lm_warmup_steps, recipe.lm_warmup_lr, training, loss_of_step, log, "lm"
    )


def staged(model, pixels, processor, batcher, world: World, recipe, training, log) -> dict:
    """Stages (a), warm-up, (b), (c) on ``model`` in place (``pixels``: the training split's);
    the record: each stage's loss curve (stage (c)'s as ``loss``) and the zero-shot accuracy."""
    tokenizer = processor.tokenizer
    scenes = world.splits["train"]
    test = [s.image for s in world.splits["test"]]
    test_pixels = processor.image_processor(test, return_tensors="pt")["pixel_values"]
    record: dict = {"kind": "llava"}
    record["clip"] = contrastive(
        model, pixels, test_pixels, tokenizer, world, recipe, training, log
    )
    z = record["clip"]["zero_shot"]
    chance = z["chance_top1"]
    log(f"  zero-shot top-1 {z['top1']:.3f} (chance {chance:.3f}), recall {z['recall']:.3f}")
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    tower.eval()
    features = tower_features(model, pixels)
    image_token = tokenizer.convert_tokens_to_ids(tiny.IMAGE)
    if recipe.lm_warmup_steps:
        record["lm_warmup"] = {
            "loss": lm_warmup(model, scenes, tokenizer, world, recipe, training, log)
        }
    names = world.config.names
    rng = np.random.default_rng([world.seed, 10])
    projector = list(model.model.multi_modal_projector.parameters())
    if recipe.projector_steps:

        def caption_step(_step: int) -> torch.Tensor:
            pick = rng.integers(0, len(scenes), training.batch_size)
            batch = batcher([(CAPTION_PROMPT, scenes[i].caption) for i in pick])
            return embedded_loss(model, features[torch.from_numpy(pick)], batch, image_token)

        curve = _optimise(
            projector,
            recipe.projector_steps,
            recipe.projector_lr,
            training,
            caption_step,
            log,
            "projector",
        )
        record["projector"] = {"loss": curve}
    rng = np.random.default_rng([world.seed, 7])

    def instruct_step(_step: int) -> torch.Tensor:
        pick = rng.integers(0, len(scenes), training.batch_size)
        batch = batcher([example(scenes[i], names, training.caption_share, rng) for i in pick])
        return embedded_loss(model, features[torch.from_numpy(pick)], batch, image_token)

    trainable = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    record["loss"] = _optimise(
        trainable, training.steps, training.lr, training, instruct_step, log, "model"
    )
    tower.requires_grad_(True)
    return record


def recipe_summary(record: dict, projector: dict, test: dict) -> dict:
    """What issue 16 asks per seed: the recipe, the tower's zero-shot object accuracy (llava
    recipe only: scratch has no text encoder), the projector VL-SAE's shared concepts and
    image-caption top-k overlap, and the guard-off random-split accuracy on test."""
    recipe = record.get("recipe")
    first = next(iter(test.values()))
    return {
        "kind": recipe["kind"] if recipe else "scratch",
        "zero_shot": recipe["stages"]["clip"]["zero_shot"] if recipe else None,
        "shared_concepts": int(projector.get("n_shared", 0)),
        "cross_modal_overlap": projector.get("cross_modal_overlap"),
        "random_accuracy": first["splits"]["random"]["off"]["accuracy"],
    }


def recipe_lines(seeds: list[dict]) -> str:
    """One line per seed: zero-shot accuracy, shared concepts, top-k overlap, random accuracy."""
    lines = []
    for s in seeds:
        r = s["recipe"]
        z = r["zero_shot"]
        zs = (
            f"zero-shot top-1 {100 * z['top1']:.1f}% (chance {100 * z['chance_top1']:.1f}%), "
            f"recall {100 * z['recall']:.1f}%"
            if z
            else "zero-shot n/a (no text encoder)"
        )
        overlap = r["cross_modal_overlap"]
        overlap = "n/a" if overlap is None else f"{overlap:.3f}"
        lines.append(
            f"- seed {s['seed']} ({r['kind']}): {zs}; projector SAE: {r['shared_concepts']} shared "
            f"concepts, image-caption top-k overlap {overlap}; "
            f"random-split accuracy (guard off) {r['random_accuracy']:.1f}%"
        )
    return "\n".join(lines)
