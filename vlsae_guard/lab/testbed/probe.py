"""What the image tokens say about each object: linear probes on the projector output.

A planted hallucination ("yes, a kite" on a ball without a kite) can start in the image
tokens (the evidence that there is no kite is weak, so the learned prior decides) or in the
language model (the evidence is there, but the prior outweighs it). The projector guard can
only re-express evidence the image tokens hold, so which of the two happens decides what it
can do. A ridge probe on the image's mean projector output, trained on fresh *unbiased* images
of the same world (another seed, never the test images), measures how well each object is
linearly decodable from what the language model receives; it is then read on the test split,
in particular on the bias-breaking images.

For the unnamed context (the stripes -> C), one more probe reads the stripes themselves: if the
cue is decodable from the image tokens and the probe for C does not fire on striped images
without C, the cue reaches the language model as itself, and the model's "yes" comes from what
it learned to make of the cue.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backends import load
from ...pipeline.collect import SiteReader
from .world import Scene, World, build_world

PROBE_SEED_OFFSET = 1000  # probe images: the validation split of world seed + this offset


def ridge_scores(x_train: Tensor, y_train: Tensor, x_test: Tensor, lam: float) -> Tensor:
    """Decision scores of a ridge classifier (targets ±1, standardised features, no bias
    term needed after centring); ``lam`` is the penalty per training example. ``y_train``: one
    label per example (N) or one column per classifier (N x C), all solved at once."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    target = y_train.to(a.dtype) * 2 - 1
    gram = a.T @ a + lam * len(a) * torch.eye(a.shape[1], dtype=a.dtype)
    return b @ torch.linalg.solve(gram, a.T @ (target - target.mean(0))) + target.mean(0)


@torch.inference_mode()
def pooled_image_tokens(reader: SiteReader, scenes: list[Scene], batch_size: int = 64) -> Tensor:
    """Each scene's projector output, averaged over its image tokens (float64, N x d)."""
    out = []
    for start in range(0, len(scenes), batch_size):
        batch = scenes[start : start + batch_size]
        rows = reader([s.image for s in batch], [""] * len(batch), list(range(len(batch))))
        out += [vision.double().mean(0) for vision, _ in rows]
    return torch.stack(out)


def probe(model_dir, world: World, n_images: int = 1500, lam: float = 0.01) -> dict:
    """Per object: the probe's balanced test accuracy (objects are in a minority of images,
    so plain accuracy rewards always saying "no"). Per bias pair (A, B): how often it reads B
    on test images with A and without B, and on test images with B."""
    fresh = world.config.model_copy(update={"n_train": 1, "n_val": n_images, "n_test": 1})
    train = build_world(fresh, world.seed + PROBE_SEED_OFFSET).splits["val"]
    test = world.splits["test"]
    reader = SiteReader(*load(str(model_dir)), layer=None)
    x_train = pooled_image_tokens(reader, train)
    x_test = pooled_image_tokens(reader, test)
    names = world.config.names
    c = world.config.context_object

    def truth(scenes: list[Scene]) -> torch.Tensor:
        columns = [[name in s.present for name in names] for s in scenes]
        return torch.tensor([row + [s.stripes] for row, s in zip(columns, scenes, strict=True)])

    reads = ridge_scores(x_train, truth(train), x_test, lam) > 0  # (test images, objects + 1)
    says = dict(zip([*names, "stripes"], reads.T, strict=True))
    objects = {
        name: balanced_accuracy(says[name], torch.tensor([name in s.present for s in test]))
        for name in names
    }
    pairs = {
        f"{a}->{b}": _reads(says[b], test, lambda s, a=a: a in s.present, b)
        for a, b in world.config.bias_pairs
    }
    out = {
        "probe_images": n_images,
        "lambda": lam,
        "test_images": len(test),
        "balanced_accuracy": objects,
        "bias_pairs": pairs,
        "context": None,
    }
    if c is not None:
        stripes = torch.tensor([s.stripes for s in test])
        reads = _reads(says[c], test, lambda s: s.stripes, c)
        reads["cue_balanced_accuracy"] = balanced_accuracy(says["stripes"], stripes)
        out["context"] = {f"stripes->{c}": reads}
    return out


def _reads(says_b: Tensor, test: list[Scene], cue, b: str) -> dict:
    """How often the probe reads B on test images with the cue and without B, and with B."""
    broken = [i for i, s in enumerate(test) if cue(s) and b not in s.present]
    with_b = [i for i, s in enumerate(test) if b in s.present]
    return {
        "reads_b_without_b": _share(says_b, broken),
        "reads_b_with_b": _share(says_b, with_b),
        "n_without_b": len(broken),
        "n_with_b": len(with_b),
    }


def balanced_accuracy(says: Tensor, truth: Tensor) -> float:
    """Mean of the hit rate on positives and on negatives (0.5: chance)."""
    rates = [(says[truth == v] == v).double().mean() for v in (True, False) if (truth == v).any()]
    return float(torch.stack(rates).mean())


def _share(flags: Tensor, idx: list[int]) -> float | None:
    return float(flags[idx].double().mean()) if idx else None
