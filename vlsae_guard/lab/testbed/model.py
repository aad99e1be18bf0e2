"""A small LLaVA trained on the testbed world, cached by what decides its weights.

Two recipes (:class:`~.recipe.RecipeConfig`): ``llava``, LLaVA's stages (:mod:`.recipe`), and
``scratch``, described here: the whole model from random weights in one loop.

The architecture is the real one (``LlavaForConditionalGeneration``: CLIP vision tower,
projector, Llama), sized by :mod:`vlsae_guard.lab.tiny` and saved in the llava-hf hub layout, so
every loader and backend takes the same path as with a 7B checkpoint. Training is a plain torch
loop on captioning and POPE-style yes/no questions in the exact prompt the POPE harness sends
with ``--prompt-format chat-template`` (the model's own template, ``"USER: <image>\\n{prompt}
ASSISTANT:"``, with LLaVA's answer instruction; shorter than LLaVA-1.5's system-prompt
conversation, which halves the CPU cost); the loss covers only the answer tokens.

Training questions ask about absent objects uniformly at random, so in the biased training
split "is there a B?" next to A almost always means "yes": the model can lower its loss by
learning the co-occurrence instead of looking, which is what the testbed measures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from ...pipeline.train import warmup_cosine
from ...provenance import sha256_dir
from ...validation import FrozenSettings
from .. import tiny
from .recipe import RecipeConfig, staged
from .world import World, example

CACHE_FORMAT = 1  # bump when training changes in a way the configs do not show


class ModelConfig(FrozenSettings):
    """Sizes of the LLaVA (the image size comes from the world); text head_dim must be >= 32
    because vLLM's CPU attention rejects smaller heads."""

    patch_size: int = Field(default=8, ge=1)
    vision_hidden: int = Field(default=128, ge=8)
    vision_intermediate: int = Field(default=256, ge=8)
    vision_layers: int = Field(default=2, ge=1)
    vision_heads: int = Field(default=4, ge=1)
    text_hidden: int = Field(default=128, ge=32)
    text_intermediate: int = Field(default=256, ge=8)
    text_layers: int = Field(default=2, ge=1)
    text_heads: int = Field(default=4, ge=1)

    def sizes(self, image_size: int) -> tiny.TinySizes:
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of {self.patch_size}")
        if self.text_hidden // self.text_heads < 32:
            raise ValueError("text head_dim (text_hidden / text_heads) must be >= 32")
        return tiny.TinySizes(image_size=image_size, **self.model_dump())


class TrainingConfig(FrozenSettings):
    steps: int = Field(default=1200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1.5e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup: float = Field(default=0.05, ge=0, lt=1)
    caption_share: float = Field(default=0.1, ge=0, le=1)  # the rest: yes/no, half each
    # torch threads: part of what decides the weights. 1, because on a shared 2-core machine
    # two OpenMP threads per process spin against other jobs (6x slower measured here).
    threads: int = Field(default=1, ge=1)


@dataclass(frozen=True)
class TrainedModel:
    path: Path
    sha256: str
    cached: bool  # loaded from the cache, not trained in this call
    record: dict  # training.json: configs, loss curve, seconds


def cache_key(
    world: World, model: ModelConfig, training: TrainingConfig, recipe: RecipeConfig | None = None
) -> str:
    """sha256 over everything that decides the weights (the recipe only when it is not
    ``scratch``: scratch models keep the keys they had before recipes existed)."""
    blob = {
        "format": CACHE_FORMAT,
        "seed": world.seed,
        "world": world.config.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
    }
    if recipe is not None and recipe.kind != "scratch":
        blob["recipe"] = recipe.model_dump(mode="json")
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def trained_model(
    world: World,
    model: ModelConfig,
    training: TrainingConfig,
    cache: Path,
    log=print,
    recipe: RecipeConfig | None = None,
) -> TrainedModel:
    """The checkpoint for (world, model, training, recipe): from ``cache`` if there, else
    trained (``recipe`` None: scratch)."""
    key = cache_key(world, model, training, recipe)
    directory = Path(cache) / f"llava-testbed-{key[:16]}"
    record_path = directory / "training.json"
    if record_path.is_file():
        return TrainedModel(
            directory, sha256_dir(directory), True, json.loads(record_path.read_text())
        )
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    record = train(world, model, training, partial, log, recipe)
    record["cache_key"] = key
    # The checkpoint (and so its sha256) holds only what the seed decides, not the timing.
    seconds = record.pop("seconds")
    (partial / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, directory)  # atomic: a killed run leaves no half checkpoint behind
    return TrainedModel(directory, sha256_dir(directory), False, {**record, "seconds": seconds})


def chat_prompt(processor, prompt: str) -> str:
    """The text the harness's hf backend builds for ``--prompt-format chat-template``."""
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    conversation = [{"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


class _Batcher:
    """Token ids of (prompt, answer) examples; the loss mask covers the answer and EOS only."""

    def __init__(self, processor, image_tokens: int):
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_tokens = image_tokens
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompts:
            ids = self.tok(chat_prompt(self.processor, prompt)).input_ids
            image = self.tok.convert_tokens_to_ids(tiny.IMAGE)
            at = ids.index(image)  # LLaVA's processor expands <image> to one token per patch
            self._prompts[prompt] = ids[:at] + [image] * self.image_tokens + ids[at + 1 :]
        return self._prompts[prompt]

    def __call__(self, examples: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        rows = []
        for prompt, answer in examples:
            p = self.prompt_ids(prompt)
            a = self.tok(" " + answer, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            rows.append((p + a, [-100] * len(p) + a))
        # A few fixed widths: CPU kernels re-plan for every new shape.
        width = -(-max(len(ids) for ids, _ in rows) // 16) * 16
        pad = self.tok.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(
    world: World,
    model_config: ModelConfig,
    config: TrainingConfig,
    out: Path,
    log=print,
    recipe: RecipeConfig | None = None,
) -> dict:
    """Train from random initialisation with ``recipe`` (None: scratch) and save to ``out``;
    returns the training record."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    sizes = model_config.sizes(world.config.image_size)
    out.mkdir(parents=True)
    # The tokenizer and processor files first: training reads its processor from them.
    tiny.build_hf_llava(out, seed=world.seed, **vars(sizes))
    processor = AutoProcessor.from_pretrained(out)
    scenes = world.splits["train"]
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")[
        "pixel_values"
    ]
    batcher = _Batcher(processor, sizes.image_seq_length)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(world.seed)
            model = LlavaForConditionalGeneration(tiny.llava_config(sizes, processor.tokenizer))
            # Unit-scale init with sharper queries/keys, not transformers' std 0.02: from the
            # latter, training sat on the blind plateau (every answer "No") for 800+ steps.
            tiny.randomize(model, world.seed)
            model.train()
            if recipe is None or recipe.kind == "scratch":
                stages = None
                losses = _fit(model, scenes, pixels, batcher, world, config, log)
            else:
                stages = staged(model, pixels, processor, batcher, world, recipe, config, log)
                losses = stages.pop("loss")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    seconds = time.perf_counter() - started
    tiny.save_hf_llava(model.eval(), out, sizes)
    record = {
        "seed": world.seed,
        "world": world.config.model_dump(mode="json"),
        "model": model_config.model_dump(mode="json"),
        "training": config.model_dump(mode="json"),
        "loss": losses,
        "seconds": round(seconds, 1),
    }
    if stages is not None:  # scratch records stay as they were
        record["recipe"] = {**recipe.model_dump(mode="json"), "stages": stages}
    return record


def _fit(model, scenes, pixels, batcher, world: World, config: TrainingConfig, log) -> list:
    rng = np.random.default_rng([world.seed, 7])
    names = world.config.names
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(config.steps, config.warmup))
    curve, window = [], []
    every = max(1, config.steps // 10)
    for step in range(config.steps):
        pick = rng.integers(0, len(scenes), config.batch_size)
        batch = batcher([example(scenes[i], names, config.caption_share, rng) for i in pick])
        loss = model(pixel_values=pixels[torch.from_numpy(pick)], **batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == config.steps:
            curve.append({"step": step + 1, "loss": round(float(np.mean(window)), 4)})
            log(f"  model step {step + 1}/{config.steps}: loss {curve[-1]['loss']:.3f}")
            window = []
    return curve
