"""Tiny stores (collected from the tiny LLaVA) and SAEs fitted to them, for concept tests.

``concepts_env``: a projector store and a VL-SAE. The SAE is not trained: its encoder rows are
unit-normalised rows of the store (vision and text), so its concepts fire on real inputs; every
other concept is in the shared set.

``vision_env``: the same pairs collected at the vision tower's layer 0 (``vision_tower:0``, CLS
first) and an untrained Matryoshka SAE there, its threshold set so that each token keeps a
varying handful of concepts (spare code slots hold 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vlsae_guard
from vlsae_guard.backends.hf import HFInputs
from vlsae_guard.core.sae import VLSAE
from vlsae_guard.core.sae_config import SAEConfig, Source
from vlsae_guard.lab.demo import make_scenes
from vlsae_guard.pipeline.collect import CollectConfig, collect
from vlsae_guard.pipeline.store import ActivationStore

N_CONCEPTS, K = 48, 6
GROUPS = [4, 8, 20]  # the Matryoshka SAE's nested groups


@dataclass
class Env:
    root: Path
    store: Path
    sae: Path
    pairs: list[dict]  # the JSONL lines, in pair order
    n_images: int
    n_concepts: int
    d: int


def write_pairs(root: Path) -> list[dict]:
    """Ten scenes and their captions as ``root/pairs.jsonl``, plus a second caption of image 0
    (a second pair of the same image: counted once as an image)."""
    lines = []
    for i, scene in enumerate(make_scenes(10, seed=0)):
        scene.image.save(root / f"{i}.png")
        caption = " and ".join(f"a {c} {s}" for c, s in scene.objects)
        lines.append({"image": f"{i}.png", "caption": caption, "id": f"img{i}"})
    lines.append({"image": "0.png", "caption": "the <b>same</b> picture & more", "id": "img0b"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def collect_store(root: Path, model_dir: Path, model_and_processor, name: str, **settings):
    """Collect ``root/pairs.jsonl`` into ``root/name`` (4 pairs a shard) and open it."""
    model, processor = model_and_processor
    config = CollectConfig(
        model=str(model_dir),
        out=root / name,
        data={"format": "jsonl", "path": root / "pairs.jsonl"},
        batch_size=4,
        pairs_per_shard=4,
        progress=False,
        **settings,
    )
    collect(config, model=model, inputs=HFInputs(processor))
    return ActivationStore(root / name)


@pytest.fixture(scope="module")
def concepts_env(tmp_path_factory, tiny_hf_dir, hf_model_and_processor) -> Env:
    root = tmp_path_factory.mktemp("concepts")
    lines = write_pairs(root)
    store = collect_store(root, tiny_hf_dir, hf_model_and_processor, "store")
    d = store.manifest.dims["vision"]
    rows = torch.cat(
        [store.load(p, ("vision",))["vision"] for p in range(len(store.shards))]
        + [store.load(p, ("text",))["text"] for p in range(len(store.shards))]
    )
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(rows), generator=gen)[:N_CONCEPTS]
    sae = VLSAE(
        SAEConfig(
            d_in=d,
            n_concepts=N_CONCEPTS,
            k=K,
            source=Source(model_id=str(tiny_hf_dir), site="projector"),
            shared_concepts=list(range(0, N_CONCEPTS, 2)),
        )
    )
    with torch.no_grad():
        sae.encoder.copy_(rows[pick] + 0.01 * torch.randn(N_CONCEPTS, d, generator=gen))
    sae.save_pretrained(root / "sae")
    return Env(root, root / "store", root / "sae", lines, 10, N_CONCEPTS, d)


@pytest.fixture(scope="module")
def vision_env(tmp_path_factory, tiny_hf_dir, hf_model_and_processor) -> Env:
    root = tmp_path_factory.mktemp("vision-concepts")
    lines = write_pairs(root)
    store = collect_store(root, tiny_hf_dir, hf_model_and_processor, "store", site="vision_tower:0")
    d = store.manifest.dims["vision"]
    sae = vlsae_guard.build(
        SAEConfig(
            architecture="matryoshka",
            d_in=d,
            n_concepts=sum(GROUPS),
            k=K,
            groups=GROUPS,
            source=Source(model_id=str(tiny_hf_dir), site="vision_tower", layer=0),
        )
    )
    rows = torch.cat([store.load(p, ("vision",))["vision"] for p in range(len(store.shards))])
    with torch.no_grad():
        scores = sae.encode(rows)  # threshold -1 (untrained): every positive activation
        # About K of the concepts above the threshold per token, fewer or more on some.
        sae.threshold.fill_(float(scores.flatten().quantile(1 - K / sum(GROUPS))))
    sae.save_pretrained(root / "sae")
    return Env(root, root / "store", root / "sae", lines, 10, sum(GROUPS), d)
