"""``vlsae-guard ms``: the monosemanticity score of an SAE's concepts on a store's images.

Embeddings come from a file the user computed with a separate encoder (CLIP, DINOv2, ...), one
row per image of the store, keyed so that rows can be matched to images:

* ``.safetensors``: tensor ``embeddings`` (N x D); metadata ``images`` (a JSON list of the
  store's image paths, as recorded in its shards) or ``ids`` (a JSON list of pair ids);
* ``.npz``: array ``embeddings`` and a string array ``images`` or ``ids`` (no pickles).

Without keys the rows must follow :func:`store_images` order exactly (same N). Every image of
the store needs a row; extra rows are ignored. The baseline is the paper's: the model's raw
neurons (each dimension of the stored rows), pooled over an image's tokens the same way.

Pooling ``cls`` scores the CLS token's codes, as Pach et al. do (vision-tower SAEs only, see
:mod:`.pooled`). A Matryoshka SAE's results also say each concept's group level and summarise
each group apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.sae import SparseAutoencoder
from ..outputs import write_with
from ..pipeline.store import ActivationStore
from .catalog import first_pairs, store_records
from .monosemanticity import MSAccumulator
from .pooled import ConceptsError, Pooling, group_levels, iter_pooled


def store_images(store: ActivationStore) -> list[tuple[int, Any, str]]:
    """(first pair index, image key, pair id) of each distinct image, in store order: the row
    order an unkeyed embeddings file must follow."""
    records = store_records(store)
    return [(p, image, records[p]["id"]) for p, image in sorted(first_pairs(records).items())]


def read_embeddings(path: str | Path) -> tuple[Tensor, str | None, list[Any] | None]:
    """(embeddings N x D, key kind 'images'/'ids' or None, keys or None)."""
    file = Path(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(file, framework="pt") as f:
                    if "embeddings" not in f.keys():  # noqa: SIM118
                        raise ConceptsError(
                            f"{file}: no tensor 'embeddings' (found {sorted(f.keys())})"
                        )
                    emb = f.get_tensor("embeddings")
                    meta = f.metadata() or {}
            except SafetensorError as e:
                raise ConceptsError(f"{file}: not a safetensors file ({e})") from e
            kind = next((k for k in ("images", "ids") if k in meta), None)
            keys = json.loads(meta[kind]) if kind else None
        elif file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as data:
                if "embeddings" not in data:
                    raise ConceptsError(f"{file}: no array 'embeddings' (found {data.files})")
                emb = torch.from_numpy(np.array(data["embeddings"]))
                kind = next((k for k in ("images", "ids") if k in data), None)
                keys = data[kind].tolist() if kind else None
        else:
            raise ConceptsError(f"{file}: expected a .safetensors or .npz file")
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, ConceptsError):
            raise
        raise ConceptsError(f"{file}: not readable ({e})") from e
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ConceptsError(
            f"{file}: 'embeddings' must be a 2-D float matrix (N images x D), "
            f"found {tuple(emb.shape)} {emb.dtype}"
        )
    if keys is not None and len(keys) != len(emb):
        raise ConceptsError(f"{file}: {len(keys)} {kind} for {len(emb)} embedding rows")
    return emb, kind, keys


def align_embeddings(store: ActivationStore, path: str | Path) -> tuple[Tensor, Tensor]:
    """(first pair index of each store image, its embedding row), checked against the file."""
    file = Path(path)
    emb, kind, keys = read_embeddings(file)
    images = store_images(store)
    pairs = torch.tensor([p for p, _, _ in images], dtype=torch.long)
    if kind is None:
        if len(emb) != len(images):
            raise ConceptsError(
                f"{file}: {len(emb)} embedding rows but the store {store.directory} holds "
                f"{len(images)} images (without 'images' or 'ids' keys the rows must be the "
                "store's images in order)"
            )
        return pairs, emb
    where = {str(k): row for row, k in enumerate(keys)}
    rows, missing = [], []
    for _, image, pair_id in images:
        key = str(image) if kind == "images" else pair_id
        if key in where:
            rows.append(where[key])
        else:
            missing.append(key)
    if missing:
        raise ConceptsError(
            f"{file}: {len(missing)} of the store's {len(images)} images have no embedding "
            f"(matched by {kind}; first missing: {missing[:3]})"
        )
    return pairs, emb[torch.tensor(rows, dtype=torch.long)]


@dataclass
class MSResult:
    scores: Tensor  # (K,) NaN: dead
    baseline: Tensor | None  # (d,) raw neurons
    images: int
    groups: Tensor | None = None  # (K,) Matryoshka group level of each concept, else None

    @staticmethod
    def summary(
        scores: Tensor, units: Tensor | None = None, groups: Tensor | None = None
    ) -> dict[str, Any]:
        """Distribution of ``scores``; ``units`` are their unit numbers (default 0..n-1), and
        with ``groups`` (per unit) the best unit also says its group."""
        alive = scores[~torch.isnan(scores)]
        at = int(torch.nan_to_num(scores, nan=-torch.inf).argmax()) if len(alive) else None
        best = None
        if at is not None:
            unit = at if units is None else int(units[at])
            best = {"unit": unit, "score": float(scores[at])}
            if groups is not None:
                best["group"] = int(groups[unit])
        return {
            "units": len(scores),
            "dead": int(torch.isnan(scores).sum()),
            "mean": float(alive.mean()) if len(alive) else float("nan"),
            "median": float(alive.median()) if len(alive) else float("nan"),
            "std": float(alive.std()) if len(alive) > 1 else float("nan"),
            "best": best,
        }

    def summaries(self) -> dict[str, dict[str, Any]]:
        """Name -> summary: the SAE's concepts, each Matryoshka group's ("sae group g"), and
        the raw neurons."""
        out = {"sae": self.summary(self.scores, groups=self.groups)}
        if self.groups is not None:
            for g in range(int(self.groups.max()) + 1):
                units = (self.groups == g).nonzero().flatten()
                out[f"sae group {g}"] = self.summary(self.scores[units], units, self.groups)
        if self.baseline is not None:
            out["raw neurons"] = self.summary(self.baseline)
        return out


def store_monosemanticity(
    store: ActivationStore,
    sae: SparseAutoencoder,
    embeddings: str | Path,
    pooling: Pooling = "mean",
    baseline: bool = True,
) -> MSResult:
    """MS of every SAE concept (and, with ``baseline``, every raw neuron) over the store's
    images, streaming shard by shard; ``pooling`` also pools the raw neurons."""
    batches = iter_pooled(store, sae, "vision", pooling, raw=baseline)  # checks the store first
    pairs, emb = align_embeddings(store, embeddings)
    row_of = {p: i for i, p in enumerate(pairs.tolist())}
    acc = MSAccumulator(sae.n_concepts, emb.shape[1])
    raw_acc = None
    if baseline:
        raw_acc = MSAccumulator(store.manifest.dims["vision"], emb.shape[1])
    for batch in batches:
        take = [(b, row_of[p]) for b, p in enumerate(batch.pairs.tolist()) if p in row_of]
        if not take:
            continue
        local = torch.tensor([b for b, _ in take], dtype=torch.long)
        e = emb[torch.tensor([r for _, r in take], dtype=torch.long)]
        acc.add(batch.codes.index_select(0, local), e)
        if raw_acc is not None:
            raw_acc.add(batch.raw[local], e)
    return MSResult(acc.scores(), raw_acc.scores() if raw_acc else None, acc.n, group_levels(sae))


def histogram(result: MSResult, out: Path, bins: int = 50) -> Path:
    """PNG histogram of the alive scores, SAE concepts against raw neurons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.linspace(-1, 1, bins + 1)
    series = [("SAE concepts", result.scores)]
    if result.baseline is not None:
        series.append(("raw neurons", result.baseline))
    for name, scores in series:
        alive = scores[~torch.isnan(scores)].numpy()
        ax.hist(alive, bins=edges, alpha=0.6, density=True, label=f"{name} (n={len(alive)})")
    ax.set_xlabel("monosemanticity score")
    ax.set_ylabel("density")
    ax.set_title(f"MS over {result.images} images")
    ax.legend()
    fig.tight_layout()
    write_with(out, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return out
