"""The hallucination lab: world -> model -> VL-SAEs -> every method's settings on val -> test.

Per seed: build the world (two planted causes, :mod:`.world`), train (or load from the cache)
the LLaVA (:mod:`.model`, :mod:`.recipe`), read the diagnostic off it (:mod:`.diagnostic`),
collect its activations on training images with :func:`vlsae_guard.pipeline.collect.collect`,
train the VL-SAEs with :func:`vlsae_guard.pipeline.train.train` (projector site; and
``layer:L`` with the auxiliary AE for paper mode), run the POPE harness A/B on the *validation*
questions for every VL-SAE variant at every alpha and every peer method at every setting of its
grid, choose each method's setting there (:func:`.evaluation.choose`, a function of validation
numbers only), and run the harness once per method at that setting on the *test* questions.
Seeds are then pooled (:mod:`.pooling`): means of the metrics, McNemar's exact test on the
summed discordant pairs, and the ``summary`` rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from pydantic import Field

from ... import provenance
from ...backends import load
from ...concepts.object_map import Labelled, fit_from_images
from ...core.checkpoint import load as load_sae
from ...harness.common import BenchmarkError
from ...pipeline.collect import CollectConfig, SiteReader, collect
from ...pipeline.pairs import JsonlData
from ...pipeline.train import AlignConfig, TrainConfig, train
from ...validation import FrozenSettings
from . import diagnostic, pooling
from .evaluation import (
    DEFAULT_PEERS,
    DEFAULT_VARIANTS,
    EvalConfig,
    Peer,
    ab,
    candidates,
    choose,
    select,
    summary_scores,
)
from .model import ModelConfig, TrainingConfig, trained_model
from .probe import probe
from .recipe import RecipeConfig, recipe_summary
from .world import Statistics, World, WorldConfig, build_world


class SAESettings(FrozenSettings):
    """The VL-SAEs: what is collected and how ``vlsae-guard train`` is run on it."""

    pairs: int = Field(default=600, ge=2)  # training images (with their captions) collected
    expansion: int = Field(default=8, ge=1)
    k: int = Field(default=16, ge=1)
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=512, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    align_epochs: int = Field(default=30, ge=1)  # paper mode's auxiliary AE (stage 1)
    align_batch_size: int = Field(default=128, ge=2)
    align_lr: float = Field(default=1e-3, gt=0)
    # training images (with the objects their captions name) the object map of cue masking is
    # fitted on: the captions the model learned its prior from
    object_images: int = Field(default=1500, ge=3)


class ExperimentConfig(FrozenSettings):
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    # LLaVA's stages; {"recipe": {"kind": "scratch"}}: the earlier tables' one-loop recipe
    # (benchmarks/configs/testbed-scratch-v1.json: their whole configuration).
    recipe: RecipeConfig = RecipeConfig()
    sae: SAESettings = SAESettings()
    eval: EvalConfig = EvalConfig()

    @classmethod
    def fast(cls) -> ExperimentConfig:
        """A tiny configuration (tests, smoke runs): seconds, and numbers that mean little."""
        return cls(
            world=WorldConfig(n_train=96, n_val=12, n_test=16),
            model=ModelConfig(
                vision_hidden=32,
                vision_intermediate=64,
                vision_heads=1,
                text_hidden=64,
                text_intermediate=128,
                text_heads=2,
            ),
            training=TrainingConfig(steps=8, batch_size=8),
            recipe=RecipeConfig(  # the staged recipe, so the fast run exercises it end to end
                kind="llava", clip_steps=8, clip_batch_size=16, lm_warmup_steps=4, projector_steps=4
            ),
            sae=SAESettings(
                pairs=24,
                epochs=2,
                batch_size=64,
                align_epochs=2,
                align_batch_size=8,
                object_images=48,
            ),
            eval=EvalConfig(
                variants=(
                    DEFAULT_VARIANTS[0],
                    DEFAULT_VARIANTS[3],
                    DEFAULT_VARIANTS[4].model_copy(update={"grid": DEFAULT_VARIANTS[4].grid[:2]}),
                ),
                alphas=(0.5, 1.0),
                peers=tuple(Peer(method=p.method, grid=p.grid[:1]) for p in DEFAULT_PEERS),
                bootstrap=50,
                diagnostic_images=4,
                probe_images=48,
            ),
        )

    @classmethod
    def demo(cls) -> ExperimentConfig:
        """The README demo's lab: the default world, model and recipe with fewer training images
        and shorter pre-training stages, on two torch threads (about 70 s on an idle 2-core
        CPU; measured in docs/testbed.md)."""
        return cls(
            world=WorldConfig(n_train=2000, n_val=50, n_test=120),
            training=TrainingConfig(threads=2),
            recipe=RecipeConfig(clip_steps=300, lm_warmup_steps=100, projector_steps=100),
            sae=SAESettings(pairs=300, epochs=20),
            eval=EvalConfig(variants=(DEFAULT_VARIANTS[0], DEFAULT_VARIANTS[4]), peers=()),
        )

    @property
    def paper_layer(self) -> int:
        """Paper mode's layer: the input of the last decoder layer (LLaVA-7B's 30 of 32)."""
        return self.model.text_layers - 1


# --- one seed --------------------------------------------------------------------------------


def run_seed(config: ExperimentConfig, seed: int, out: Path, cache: Path, log=print) -> dict:
    """Everything for one seed under ``out``; returns what results.json records for it."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 1)
        clock = now

    world = build_world(config.world, seed)
    files = {split: world.write(split, out / split) for split in ("val", "test")}
    sets, causes = world.config.question_sets, world.config.causes
    lap("world")
    log(f"seed {seed}: model")
    model = trained_model(world, config.model, config.training, cache, log, config.recipe)
    lap("model")
    diagnosis = diagnostic.diagnose(model.path, world, config.eval.diagnostic_images)
    probes = probe(model.path, world, config.eval.probe_images)
    lap("diagnostic")
    log(f"seed {seed}: VL-SAEs")
    saes, sae_stats = train_saes(world, model.path, config, out / "sae")
    lap("sae")
    methods = candidates(config.eval, saes, config.paper_layer)
    val, first = [], None  # the first run's "none" answers serve every later run
    for grid in methods:
        for i, c in enumerate(grid):
            log(f"seed {seed}: validation {c.name} {c.settings}")
            where = out / "val_runs" / f"{c.name}-{i}"
            run = ab(model.path, c, files["val"], sets, causes, where, config.eval, seed, first)
            first = first or where
            val.append({"name": c.name, "family": c.family, "settings": c.settings})
            val[-1].update(summary_scores(run))
    chosen = choose(val)
    lap("validation")
    test, first = {}, None
    for grid in methods:
        c = next(x for x in grid if x.settings == chosen[x.name]["settings"])
        log(f"seed {seed}: test {c.name} {c.settings}")
        where = out / "test_runs" / c.name
        test[c.name] = ab(
            model.path, c, files["test"], sets, causes, where, config.eval, seed, first
        )
        first = first or where
    lap("test")
    return {
        "seed": seed,
        "model": {
            "path": str(model.path),
            "sha256": model.sha256,
            "cached": model.cached,
            "training": model.record,
        },
        "sae": {
            # The folder's hash covers its provenance (paths, speed); the weights' hash is what
            # the seed decides.
            site: {
                "path": str(d),
                "sha256": provenance.sha256_dir(d),
                "weights_sha256": provenance.sha256_file(d / "model.safetensors"),
            }
            for site, d in saes.items()
        },
        "world": world_summary(world),
        "recipe": recipe_summary(model.record, sae_stats["projector"], test),
        "diagnostic": diagnosis,
        "probe": probes,
        "validation": val,
        "chosen": chosen,
        "selected": select(chosen),
        "test": test,
        # plain decoding's seconds on the test questions (generated once, by the first run)
        "none_seconds": next(iter(test.values()))["arm_seconds"].get("none"),
        "seconds": seconds,
    }


def world_summary(world: World) -> dict:
    """The planted causes as measured: P(B | A) and P(C | stripes) per split, question counts."""
    config, rates = world.config, {}
    c = config.context_object
    for split, scenes in world.splits.items():
        stats = Statistics.of(scenes)
        rates[split] = {f"P({b}|{a})": round(stats.rate(a, b), 3) for a, b in config.bias_pairs}
        if c is not None:
            for cue in (True, False):
                with_cue = [s for s in scenes if s.stripes == cue]
                share = sum(c in s.present for s in with_cue) / len(with_cue) if with_cue else None
                key = f"P({c}|{'stripes' if cue else 'no stripes'})"
                rates[split][key] = None if share is None else round(share, 3)
    counts = {
        split: {kind: len(qs) for kind, qs in world.questions(split).items()}
        for split in ("val", "test")
    }
    return {"cooccurrence": rates, "questions": counts, "context_object": c}


def train_saes(
    world: World, model_dir: Path, config: ExperimentConfig, out: Path
) -> tuple[dict, dict]:
    """Collect (projector; ``layer:L`` if a variant needs it) and train with the pipeline;
    the SAE folders and their training statistics, per site."""
    s = config.sae
    pairs = world.write_pairs(out, s.pairs)
    sites = {"projector": {}}
    if any(v.mode == "paper" for v in config.eval.variants):
        align = AlignConfig(epochs=s.align_epochs, batch_size=s.align_batch_size, lr=s.align_lr)
        sites[f"layer:{config.paper_layer}"] = {"pooling": "mean", "align": align}
    saes, stats = {}, {}
    for site, extra in sites.items():
        name = site.replace(":", "")
        store = out / f"store-{name}"
        collect(
            CollectConfig(
                model=str(model_dir),
                out=store,
                data=JsonlData(path=pairs),
                site=site,
                pooling=extra.get("pooling", "token"),
                batch_size=64,
                dtype="float32",
                device="cpu",
                seed=world.seed,
                workers=0,
                progress=False,
            )
        )
        result = train(
            TrainConfig(
                store=store,
                out=out / f"sae-{name}",
                expansion=s.expansion,
                k=s.k,
                epochs=s.epochs,
                batch_size=s.batch_size,
                lr=s.lr,
                align=extra.get("align"),
                seed=world.seed,
                device="cpu",
                amp="off",
                progress=False,
            )
        )
        saes[site] = result.out
        stats[site] = dict(result.sae.config.stats)
    if any(v.mode == "cue-mask" for v in config.eval.variants):
        fit_object_map(world, model_dir, saes["projector"], s.object_images)
    return saes, stats


def fit_object_map(world: World, model_dir: Path, sae_dir: Path, n: int) -> Path:
    """The projector SAE's object map (``objects.json`` beside it) from the first ``n``
    training images and the objects their captions name."""
    loaded = load(str(model_dir))
    reader = SiteReader(*loaded, layer=None)
    items = [Labelled(sc.image, frozenset(sc.present)) for sc in world.splits["train"][:n]]
    fitted_on = {"split": "train", "images": len(items), "source": "captions"}
    objects = fit_from_images(reader, load_sae(str(sae_dir)).eval(), items, fitted_on=fitted_on)
    return objects.save(Path(sae_dir) / "objects.json")


# --- all seeds ---------------------------------------------------------------------------------


def run(
    config: ExperimentConfig, seeds: list[int], out: Path, cache: Path, threads: int = 1, log=print
) -> dict:
    """All seeds, pooled; the dict benchmarks/testbed.py writes as results.json."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        per_seed = [run_seed(config, s, out / f"seed-{s}", cache, log) for s in seeds]
    finally:
        torch.set_num_threads(previous)
    names = [v.name for v in config.eval.variants] + [p.name for p in config.eval.peers]
    return {
        "benchmark": "vlsae-guard CPU hallucination lab",
        "config": config.model_dump(mode="json"),
        "seeds": seeds,
        "threads": threads,
        "paper_layer": config.paper_layer,
        "summary": pooling.summary(per_seed, names),
        "per_seed": per_seed,
        "aggregate": pooling.aggregate(per_seed, names),
        "seconds": round(time.perf_counter() - started, 1),
        "environment": provenance.environment(),
    }


def finished_run(directory: Path) -> tuple[dict, list[tuple[int, dict, World]]]:
    """A finished run of :func:`run` under ``directory`` (``benchmarks/testbed.py --out``): its
    results, and per seed (seed, per-seed record, the world rebuilt), for the scripts that
    read a run's models again (``testbed_probe.py``, ``testbed_evidence.py``)."""
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise BenchmarkError(f"{path}: no results; run benchmarks/testbed.py first")
    results = json.loads(path.read_text())
    config = WorldConfig(**results["config"]["world"])
    seeds = [
        (seed, record, build_world(config, seed))
        for seed, record in zip(results["seeds"], results["per_seed"], strict=True)
    ]
    return results, seeds
