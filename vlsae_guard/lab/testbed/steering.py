"""Steering the lab's LLaVA from its vision tower with a Matryoshka SAE (issue 18, measured).

Pach et al. (2025) steer LLaVA by clamping one concept of a vision-encoder SAE at CLIP's layer
LLaVA reads (``vision_tower:L``, every token replaced by the reconstruction). The lab has what
their steering score approximates with a CLIP judge: the objects in every image, and the
model's own answer to "Is there a {name} in the image?". Per seed:

1. collect the first ``images`` training images at ``vision_tower:L`` and train a Matryoshka
   BatchTopK SAE there with the pipeline (its explained variance, L0 and dead share recorded);
2. **reconstruction cost**: the random question set of the test split answered by the plain
   model and with every vision token replaced by its reconstruction (no clamp): accuracy;
3. **steering**: for each object o, the ``candidates`` concepts whose activation on the CLS
   token differs most between validation images with o and without (mean difference), each
   clamped to each of ``values`` (multiples of its largest validation CLS activation); chosen
   on validation: the (concept, clamp) that makes the model say "yes" to o most often on images
   without o, minus how often it then says "yes" to the other absent objects (a clamp that
   makes everything "yes" gains nothing). On the test images without o: P(answer "yes"
   to o) plain and steered (exact McNemar on the paired answers), and "yes" to the other absent
   objects plain and steered (what the clamp does besides).

Answers are the first token's "Yes" against "No" (:func:`.diagnostic.p_yes`: what greedy
decoding's first token decides).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from ...backends import detect, load
from ...core.checkpoint import load as load_sae
from ...core.guard import guard
from ...pipeline.collect import CollectConfig, SiteReader, collect
from ...pipeline.pairs import JsonlData
from ...pipeline.train import TrainConfig, train
from ...scoring.stats import mcnemar_exact
from ...validation import FrozenSettings
from .diagnostic import _load, p_yes
from .experiment import ExperimentConfig
from .model import trained_model
from .world import QUESTION, Scene, World, build_world


class SteerLabConfig(FrozenSettings):
    """The SAE trained at the vision tower and the clamp values tried on validation."""

    images: int = Field(default=1500, ge=2)  # training images collected (every token)
    expansion: int = Field(default=8, ge=1)
    k: int = Field(default=16, ge=1)
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=512, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    threshold_start: int = Field(default=200, ge=0)
    # concepts tried per object: the largest gaps of mean CLS activation, images with o minus
    # without; clamp = value x the concept's largest CLS activation on validation images
    candidates: int = Field(default=4, ge=1)
    values: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
    batch: int = Field(default=64, ge=1)  # images per forward when answering

    @classmethod
    def fast(cls) -> SteerLabConfig:
        """For ``ExperimentConfig.fast()``'s model (tests, smoke runs)."""
        return cls(images=48, epochs=2, batch_size=64, threshold_start=0, candidates=2,
                   values=(1.0, 10.0))  # fmt: skip


def train_vision_sae(world: World, model_dir: Path, config: SteerLabConfig, out: Path) -> Path:
    """Collect at the layer the model reads and train the Matryoshka SAE there."""
    model, inputs = load(str(model_dir))
    site = f"vision_tower:{detect(model).vision_feature_layer()}"
    store = out / "store-vision"
    collect(
        CollectConfig(model=str(model_dir), out=store,
                      data=JsonlData(path=world.write_pairs(out, config.images)), site=site,
                      batch_size=64, dtype="float32", device="cpu", seed=world.seed, workers=0,
                      progress=False),
        model=model, inputs=inputs,
    )  # fmt: skip
    result = train(
        TrainConfig(store=store, out=out / "sae-vision", architecture="matryoshka",
                    expansion=config.expansion, k=config.k, epochs=config.epochs,
                    batch_size=config.batch_size, lr=config.lr,
                    threshold_start=config.threshold_start, seed=world.seed, device="cpu",
                    amp="off", progress=False)
    )  # fmt: skip
    return result.out


@torch.inference_mode()
def cls_codes(reader: SiteReader, sae, scenes: list[Scene], batch: int) -> torch.Tensor:
    """Each scene's dense SAE code of its CLS token (scenes x concepts)."""
    out = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        rows = reader([s.image for s in chunk], [""] * len(chunk), list(range(len(chunk))))
        out.append(sae.encode(torch.stack([v[0] for v, _ in rows]).float()))
    return torch.cat(out)


def says_yes(model, processor, name: str, scenes: list[Scene], batch: int) -> list[bool]:
    """Whether the model's first answer token to "Is there a {name}?" is "Yes", per scene."""
    out = []
    for start in range(0, len(scenes), batch):
        chunk = [s.image for s in scenes[start : start + batch]]
        out += [p > 0.5 for p in p_yes(model, processor, QUESTION.format(name=name), chunk)]
    return out


class _Asker:
    """ "yes" rates of one model, plain or with one clamp at the vision tower."""

    def __init__(self, model, processor, sae, site: str, batch: int):
        self.model, self.processor, self.sae, self.site, self.batch = (
            model, processor, sae, site, batch,
        )  # fmt: skip

    def yes(self, name: str, scenes: list[Scene], steer: dict[int, float] | None) -> list[bool]:
        if steer is None:
            return says_yes(self.model, self.processor, name, scenes, self.batch)
        with guard(self.model, self.sae, site=self.site, steer=steer):
            return says_yes(self.model, self.processor, name, scenes, self.batch)

    def others(self, o: str, names: list[str], scenes, steer) -> list[bool]:
        """ "yes" to each absent object other than ``o``, over all (scene, object) pairs."""
        return [
            y
            for other in names
            if other != o
            for y in self.yes(other, [s for s in scenes if other not in s.present], steer)
        ]


def _rate(flags: list[bool]) -> float:
    return 100 * sum(flags) / len(flags) if flags else float("nan")


def steer_objects(model_dir: Path, sae_dir: Path, world: World, config: SteerLabConfig) -> dict:
    """Reconstruction cost and, per object, the chosen concept and clamp, and the test rates."""
    loaded = load(str(model_dir))
    layer = detect(loaded.model).vision_feature_layer()
    site = f"vision_tower:{layer}"
    reader = SiteReader(*loaded, layer=None, vision_layer=layer)
    sae = load_sae(str(sae_dir))
    model, processor = _load(model_dir)
    ask = _Asker(model, processor, sae, site, config.batch)
    val, test = world.splits["val"], world.splits["test"]
    codes = cls_codes(reader, sae, val, config.batch)
    names = world.config.names
    objects = []
    for o in names:
        has = torch.tensor([o in s.present for s in val])
        gap = codes[has].mean(0) - codes[~has].mean(0)
        absent_val = [s for s in val if o not in s.present]
        tried = []
        for concept in gap.topk(config.candidates).indices.tolist():
            top = float(codes[:, concept].max())
            for v in config.values:
                steer = {concept: v * top}
                gain = _rate(ask.yes(o, absent_val, steer))
                gain -= _rate(ask.others(o, names, val, steer))
                tried.append({"concept": concept, "gap": float(gap[concept]), "value": v * top,
                              "multiple": v, "gain": gain})  # fmt: skip
        chosen = max(tried, key=lambda t: t["gain"])
        concept = chosen["concept"]
        steer = {concept: chosen["value"]}
        absent = [s for s in test if o not in s.present]
        plain, steered = ask.yes(o, absent, None), ask.yes(o, absent, steer)
        other_plain = ask.others(o, names, test, None)
        other_steered = ask.others(o, names, test, steer)
        objects.append({
            "object": o, "concept": concept, "group": int(sae.group_of()[concept]),
            "validation": tried, "chosen": chosen,
            "test_images": len(absent),
            "yes_plain": _rate(plain), "yes_steered": _rate(steered),
            "mcnemar_p": mcnemar_exact(plain, steered),
            "others_yes_plain": _rate(other_plain), "others_yes_steered": _rate(other_steered),
        })  # fmt: skip
    return {
        "site": site,
        "sae": dict(sae.config.stats, threshold=float(sae.threshold), groups=sae.config.groups),
        "reconstruction": reconstruction_cost(ask, world),
        "objects": objects,
    }


def reconstruction_cost(ask: _Asker, world: World) -> dict:
    """Accuracy on the test split's random question set, plain and with every vision token
    replaced by the SAE's reconstruction (the paper's steering without a clamp)."""
    scenes = {s.name: s for s in world.splits["test"]}
    questions = world.questions("test")["random"]
    out = {}
    for arm, steer in (("plain", None), ("reconstructed", {})):
        correct = []
        for name in sorted({q.name for q in questions}):
            asked = [q for q in questions if q.name == name]
            said = ask.yes(name, [scenes[q.image] for q in asked], steer)
            correct += [s == (q.label == "yes") for s, q in zip(said, asked, strict=True)]
        out[arm] = correct
    return {
        "questions": len(out["plain"]),
        "accuracy_plain": _rate(out["plain"]),
        "accuracy_reconstructed": _rate(out["reconstructed"]),
        "mcnemar_p": mcnemar_exact(out["plain"], out["reconstructed"]),
    }


def run_seed(
    experiment: ExperimentConfig, config: SteerLabConfig, seed: int, out: Path, cache: Path, log
) -> dict:
    """One seed: its world and (cached) model, the SAE at the vision tower, the measurements."""
    world = build_world(experiment.world, seed)
    model = trained_model(
        world, experiment.model, experiment.training, cache, log, experiment.recipe
    )
    log(f"seed {seed}: Matryoshka SAE at the vision tower")
    sae_dir = train_vision_sae(world, model.path, config, out / f"seed-{seed}")
    log(f"seed {seed}: steering")
    result = steer_objects(model.path, sae_dir, world, config)
    return {"seed": seed, "model_sha256": model.sha256, "sae": str(sae_dir), **result}


def table(seeds: list[dict]) -> str:
    """Per seed and object: the concept, its group, the clamp, and the test "yes" rates."""
    lines = [
        "| seed | object | concept (group) | clamp | yes on absent: plain -> steered (p)"
        " | yes on other absent objects: plain -> steered |",
        "|---|---|---|---|---|---|",
    ]
    for s in seeds:
        for o in s["objects"]:
            lines.append(
                f"| {s['seed']} | {o['object']} | {o['concept']} ({o['group']}) | "
                f"{o['chosen']['multiple']:g}x = {o['chosen']['value']:.2f} | "
                f"{o['yes_plain']:.1f} -> {o['yes_steered']:.1f} ({o['mcnemar_p']:.1e}) | "
                f"{o['others_yes_plain']:.1f} -> {o['others_yes_steered']:.1f} |"
            )
    for s in seeds:
        r, sae = s["reconstruction"], s["sae"]
        lines.append(
            f"\nseed {s['seed']}: SAE at {s['site']}: explained variance "
            f"{sae.get('explained_variance_vision', float('nan')):.3f}, L0 "
            f"{sae.get('l0_vision', float('nan')):.1f}, threshold {sae['threshold']:.3f}; "
            f"random-set accuracy plain {r['accuracy_plain']:.1f}% -> reconstructed "
            f"{r['accuracy_reconstructed']:.1f}% (p = {r['mcnemar_p']:.2g}, {r['questions']} q.)"
        )
    return "\n".join(lines)
