"""Shared pieces of the vLLM tests: the SAE, engine settings and HF reference answers.

The references come from the transformers backend with :func:`vlsae_guard.core.guard` (fp32,
greedy, one request at a time), so every vLLM answer is checked against the implementation
the rest of the suite already trusts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlsae_guard import VLSAE, SAEConfig, guard
from vlsae_guard.lab.tiny import TinySizes

ALPHA = 0.8
STEPS = 8
TOKENS_PER_IMAGE = TinySizes().image_seq_length  # 49
PROMPT = "USER: <image>\n{question} ASSISTANT:"  # the tiny chat template's rendering
QUESTION = "Is there a dog in the image?"
# Small, eager (no compile) and a fixed KV cache: quick to start on a 2-core CPU.
ENGINE = dict(
    dtype="float32",
    max_model_len=512,
    seed=0,
    enforce_eager=True,
    kv_cache_memory_bytes=256 << 20,
    limit_mm_per_prompt={"image": 1},
)


def save_sae(directory: Path) -> Path:
    """A random VL-SAE for the tiny model (width 64), every third concept shared."""
    config = SAEConfig(
        d_in=TinySizes().text_hidden,
        n_concepts=256,
        k=16,
        shared_concepts=list(range(0, 256, 3)),
        source={"site": "projector"},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sae = VLSAE(config).eval()
    sae.save_pretrained(directory)
    return directory


def hf_reference(model_dir, images, question, sae_dir) -> dict[bool, list[tuple[int, ...]]]:
    """Greedy token ids per image with the guard off (False) and on (True), one at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = PROMPT.format(question=question)
    out: dict[bool, list[tuple[int, ...]]] = {}
    for on in (False, True):
        handle = guard(model, sae_dir, alpha=ALPHA) if on else None
        try:
            answers = []
            for image in images:
                inputs = processor(images=[image], text=[prompt], return_tensors="pt")
                with torch.no_grad():
                    ids = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
                answers.append(tuple(ids[0, inputs["input_ids"].shape[1] :].tolist()))
            out[on] = answers
        finally:
            if handle is not None:
                handle.remove()
    return out


def read_log(path: Path) -> list[dict]:
    """The plugin's per-projector-call records (``VLSAE_GUARD_LOG``)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def differs(reference: dict[bool, list]) -> int:
    """How many images the guard changes the answer of (a test is only as good as this)."""
    return sum(a != b for a, b in zip(reference[False], reference[True], strict=True))
