"""The testbed experiment: world -> model -> VL-SAE -> guard settings on val -> POPE A/B on test.

Per seed: build the world, train (or load from the cache) the LLaVA, collect its activations
on training images with :func:`vlsae_guard.pipeline.collect.collect`, train the VL-SAEs with
:func:`vlsae_guard.pipeline.train.train` (projector site; and ``layer:L`` with the auxiliary AE
for paper mode), run the POPE harness A/B on the *validation* questions for every guard variant and
alpha, choose each variant's alpha there (:func:`choose`, a function of validation numbers
only), and run the harness once per variant at that alpha on the *test* questions. Seeds are
then pooled (:func:`aggregate`): means of the metrics and McNemar's exact test on the summed
discordant pairs.

"Hallucination rate" is the share of "yes" among the bias-breaking questions: "is there a B?"
on test images that contain A but not B, where the training split had B with A 90% of the time.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ... import provenance
from ...core.intervention import GuardConfig
from ...harness import common
from ...harness import pope as pope_harness
from ...harness.config import PopeRunConfig
from ...pipeline.collect import CollectConfig, collect
from ...pipeline.pairs import JsonlData
from ...pipeline.train import AlignConfig, TrainConfig, train
from ...scoring.stats import discordant, mcnemar_p
from ...validation import FrozenSettings
from .model import ModelConfig, TrainingConfig, trained_model
from .recipe import RecipeConfig, recipe_lines, recipe_summary
from .world import QUESTION_SETS, Statistics, World, WorldConfig, build_world

METRICS = ("f1", "precision", "recall", "accuracy", "yes_ratio")


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


class Variant(FrozenSettings):
    """One way of guarding; its alpha is chosen on the validation split."""

    name: str
    mode: Literal["projector", "paper"] = "projector"
    rewrite: Literal["replace", "edit"] = "replace"
    text_grounded: bool = False

    def guard(self, alpha: float, layer: int) -> GuardConfig:
        """This variant's guard settings at ``alpha`` (paper mode at ``layer``)."""
        if self.mode == "paper":
            return GuardConfig(mode="paper", alpha=alpha, layer=layer)
        return GuardConfig(alpha=alpha, rewrite=self.rewrite, text_grounded=self.text_grounded)


DEFAULT_VARIANTS = (
    Variant(name="replace"),
    Variant(name="edit", rewrite="edit"),
    Variant(name="replace+text", text_grounded=True),
    Variant(name="paper", mode="paper"),
)


class EvalConfig(FrozenSettings):
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0)
    batch_size: int = Field(default=64, ge=1)
    bootstrap: int = Field(default=1000, ge=1)  # paired bootstrap replicates per split

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"need distinct variant names, got {names}")
        if not self.alphas or any(not 0 < a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be in (0, 1], got {self.alphas}")
        return self


class ExperimentConfig(FrozenSettings):
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    # Absent in configs written before recipes: they load with the default (scratch) recipe,
    # which reproduces the published results; {"recipe": {"kind": "llava"}}: LLaVA's stages.
    recipe: RecipeConfig = RecipeConfig()
    sae: SAESettings = SAESettings()
    eval: EvalConfig = EvalConfig()

    @classmethod
    def fast(cls) -> ExperimentConfig:
        """A tiny configuration (tests, demo): seconds, and numbers that mean little."""
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
            sae=SAESettings(pairs=24, epochs=2, batch_size=64, align_epochs=2, align_batch_size=8),
            eval=EvalConfig(
                variants=(DEFAULT_VARIANTS[0], DEFAULT_VARIANTS[3]), alphas=(0.5, 1.0), bootstrap=50
            ),
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
    lap("world")
    log(f"seed {seed}: model")
    model = trained_model(world, config.model, config.training, cache, log, config.recipe)
    lap("model")
    log(f"seed {seed}: VL-SAEs")
    saes, sae_stats = train_saes(world, model.path, config, out / "sae")
    lap("sae")
    val, first = [], None
    for variant in config.eval.variants:
        for alpha in config.eval.alphas:
            log(f"seed {seed}: validation {variant.name} alpha={alpha}")
            where = out / "val_runs" / f"{variant.name}-{alpha}"
            first = first or where
            run = ab(model.path, saes, variant, alpha, files["val"], where, config, seed, first)
            val.append({"variant": variant.name, "alpha": alpha, **summary_scores(run)})
    chosen = choose(val)
    lap("validation")
    test = {}
    for variant in config.eval.variants:
        alpha = chosen[variant.name]["alpha"]
        log(f"seed {seed}: test {variant.name} alpha={alpha}")
        where = out / "test_runs" / variant.name
        first = out / "test_runs" / config.eval.variants[0].name
        test[variant.name] = ab(
            model.path, saes, variant, alpha, files["test"], where, config, seed, first
        )
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
        "validation": val,
        "chosen": chosen,
        "selected": select(chosen),
        "test": test,
        "seconds": seconds,
    }


def world_summary(world: World) -> dict:
    """The planted bias as measured: P(B | A) per split, and question counts."""
    rates = {}
    for split, scenes in world.splits.items():
        stats = Statistics.of(scenes)
        rates[split] = {
            f"P({b}|{a})": round(stats.rate(a, b), 3) for a, b in world.config.bias_pairs
        }
    counts = {
        split: {kind: len(qs) for kind, qs in world.questions(split).items()}
        for split in ("val", "test")
    }
    return {"cooccurrence": rates, "questions": counts}


def train_saes(
    world: World, model_dir: Path, config: ExperimentConfig, out: Path
) -> tuple[dict, dict]:
    """Collect (projector; ``layer:L`` if a variant needs it) and train with the pipeline;
    the SAE folders and their training statistics, per site."""
    s = config.sae
    pairs = out / "pairs.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    images = world.write("train", out, questions=False)["images"]
    scenes = world.splits["train"][: s.pairs]
    pairs.write_text(
        "".join(
            json.dumps({"id": sc.name, "image": f"{images.name}/{sc.name}", "caption": sc.caption})
            + "\n"
            for sc in scenes
        )
    )
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
    return saes, stats


def ab(
    model_dir: Path,
    saes: dict[str, Path],
    variant: Variant,
    alpha: float,
    files: dict[str, Path],
    out: Path,
    config: ExperimentConfig,
    seed: int,
    baseline: Path | None = None,
) -> dict:
    """One POPE harness A/B (all four question sets); its per-split scores and hallucination.

    ``baseline``: an earlier run's output directory with the same model and questions, whose
    guard-off answers are reused (the harness resumes from them; its settings check refuses
    them if anything they depend on differs).
    """
    layer = config.paper_layer
    sae = saes[f"layer:{layer}" if variant.mode == "paper" else "projector"]
    run = PopeRunConfig(
        model=str(model_dir),
        backend="hf",
        prompt_format="chat-template",
        sae=str(sae),
        guard=variant.guard(alpha, layer),
        ab=True,
        images=files["images"],
        questions=[str(files[kind]) for kind in QUESTION_SETS],
        out=out,
        batch_size=config.eval.batch_size,
        seed=seed,
        max_new_tokens=3,
        dtype="float32",
        device="cpu",
        bootstrap=config.eval.bootstrap,
    )
    if baseline is not None:
        _reuse_off_arm(baseline, out)
    results = pope_harness.run(run, progress=False)
    off, on = results["arms"]  # none, then the guard's method (vlsae or paper)
    splits = {}
    for kind in QUESTION_SETS:
        split = results["splits"][kind]
        comparison = split["comparison"]
        splits[kind] = {
            "off": {m: split[off][m] for m in METRICS},
            "on": {m: split[on][m] for m in METRICS},
            "n": split[off]["n"],
            "mcnemar_p": comparison["mcnemar_p"],
            "discordant": comparison["discordant"],
            "ci_delta_f1": comparison["ci_delta"]["f1"],
        }
    return {
        "variant": variant.model_dump(),
        "alpha": alpha,
        "sae": str(sae),
        "guard": results["settings"]["guard"],
        "splits": splits,
        "hallucination": hallucination(out / "paired" / "bias.jsonl", off, on),
    }


def _reuse_off_arm(baseline: Path, out: Path) -> None:
    source = common.answers_dir(baseline, "none")
    target = common.answers_dir(out, "none")
    if source.is_dir() and not target.exists():
        shutil.copytree(source, target)


def hallucination(paired: Path, arm_off: str = "none", arm_on: str = "vlsae") -> dict:
    """Share of "yes" on the bias-breaking ("no") questions, guard off (arm ``arm_off`` of the
    harness) and on (``arm_on``), and McNemar on them."""
    rows = [json.loads(line) for line in paired.read_text().splitlines()]
    rows = [r for r in rows if r["label"] == "no"]
    off = [r[f"pred_{arm_off}"] == "yes" for r in rows]
    on = [r[f"pred_{arm_on}"] == "yes" for r in rows]
    n = len(rows)
    # correct = "no"; discordant counts in the harness's a/b naming (a = off, b = on)
    pairs = discordant([not x for x in off], [not x for x in on])
    return {
        "n": n,
        "off": 100 * sum(off) / n if n else float("nan"),
        "on": 100 * sum(on) / n if n else float("nan"),
        "discordant": pairs,
        "mcnemar_p": mcnemar_p(pairs),
    }


def summary_scores(run: dict) -> dict:
    """What selection sees of a validation run: both arms' F1 per set, their mean, and the
    hallucination rate."""
    f1 = {arm: {k: s[arm]["f1"] for k, s in run["splits"].items()} for arm in ("off", "on")}
    return {
        "f1": f1,
        "mean_f1": {arm: float(np.mean(list(v.values()))) for arm, v in f1.items()},
        "hallucination": {arm: run["hallucination"][arm] for arm in ("off", "on")},
    }


def choose(validation: list[dict]) -> dict[str, dict]:
    """Per variant, the validation run with the highest guard-on mean F1 over the four question
    sets (ties: the smaller alpha). Takes validation numbers only, so the test split cannot
    influence the choice."""
    best: dict[str, dict] = {}
    for run in sorted(validation, key=lambda r: (r["variant"], r["alpha"])):
        current = best.get(run["variant"])
        if current is None or run["mean_f1"]["on"] > current["mean_f1"]["on"]:
            best[run["variant"]] = run
    return {
        name: {
            "alpha": r["alpha"],
            "val_mean_f1": r["mean_f1"],
            "val_hallucination": r["hallucination"],
        }
        for name, r in best.items()
    }


def select(chosen: dict[str, dict]) -> str:
    """The variant (mode) with the best validation mean F1 at its chosen alpha (ties: the
    first in ``chosen``, i.e. alphabetical)."""
    return max(chosen, key=lambda name: chosen[name]["val_mean_f1"]["on"])


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
    return {
        "benchmark": "vlsae-guard CPU hallucination testbed",
        "config": config.model_dump(mode="json"),
        "seeds": seeds,
        "threads": threads,
        "paper_layer": config.paper_layer,
        "per_seed": per_seed,
        "aggregate": aggregate(per_seed, [v.name for v in config.eval.variants]),
        "seconds": round(time.perf_counter() - started, 1),
        "environment": provenance.environment(),
    }


def _pooled_p(counts: list[dict]) -> float:
    """Exact McNemar on discordant pairs summed over seeds (independent worlds and models)."""
    return mcnemar_p({key: sum(c[key] for c in counts) for key in counts[0]})


def _mean_sd(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    }


def aggregate(per_seed: list[dict], variants: list[str]) -> dict:
    """Per variant and question set: metric means (and sd) over seeds, pooled McNemar p.

    The entry ``selected`` pools, per seed, the variant that validation selected.
    """
    groups = {name: [s["test"][name] for s in per_seed] for name in variants}
    groups["selected"] = [s["test"][s["selected"]] for s in per_seed]
    out: dict = {}
    for name, runs in groups.items():
        entry: dict = {"alphas": [r["alpha"] for r in runs], "splits": {}}
        if name == "selected":
            entry["variants"] = [s["selected"] for s in per_seed]
        for kind in QUESTION_SETS:
            splits = [r["splits"][kind] for r in runs]
            entry["splits"][kind] = {
                arm: {m: _mean_sd([s[arm][m] for s in splits]) for m in METRICS}
                for arm in ("off", "on")
            }
            entry["splits"][kind]["n"] = sum(s["n"] for s in splits)
            entry["splits"][kind]["mcnemar_p"] = _pooled_p([s["discordant"] for s in splits])
        hall = [r["hallucination"] for r in runs]
        entry["hallucination"] = {
            "off": _mean_sd([h["off"] for h in hall]),
            "on": _mean_sd([h["on"] for h in hall]),
            "n": sum(h["n"] for h in hall),
            "mcnemar_p": _pooled_p([h["discordant"] for h in hall]),
        }
        out[name] = entry
    return out


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.1f}" + (f" ± {stat['sd']:.1f}" if stat["sd"] else "")


def table(results: dict) -> str:
    """Markdown tables of the aggregate: POPE metrics per question set, then hallucination."""
    lines = [
        "| variant (alpha per seed) | question set | F1 off | F1 on | precision off |"
        " precision on | yes % off | yes % on | n | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    hall = [
        "| variant (alpha per seed) | hallucination % off | hallucination % on | n | McNemar p |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["aggregate"].items():
        if name == "selected":
            label = "selected on val: " + ", ".join(
                f"{v} {a:g}" for v, a in zip(entry["variants"], entry["alphas"], strict=True)
            )
        else:
            label = f"{name} ({', '.join(f'{a:g}' for a in entry['alphas'])})"
        for kind, s in entry["splits"].items():
            off, on = s["off"], s["on"]
            cells = [off["f1"], on["f1"], off["precision"], on["precision"]]
            cells += [off["yes_ratio"], on["yes_ratio"]]
            row = " | ".join(_cell(c) for c in cells)
            lines.append(f"| {label} | {kind} | {row} | {s['n']} | {s['mcnemar_p']:.3g} |")
        h = entry["hallucination"]
        hall.append(
            f"| {label} | {_cell(h['off'])} | {_cell(h['on'])} | {h['n']} | {h['mcnemar_p']:.3g} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(hall)


def report(results: dict) -> str:
    """results.md: what was run, the tables, the choices and their validation numbers, time."""
    config = results["config"]
    world, training = config["world"], config["training"]
    seeds = results["per_seed"]
    rates = "; ".join(
        f"seed {s['seed']}: "
        + ", ".join(f"{k} {v}" for k, v in s["world"]["cooccurrence"]["train"].items())
        for s in seeds
    )
    test_rates = "; ".join(
        f"seed {s['seed']}: "
        + ", ".join(f"{k} {v}" for k, v in s["world"]["cooccurrence"]["test"].items())
        for s in seeds
    )
    chosen = "\n".join(
        f"- seed {s['seed']}, {name}: alpha {c['alpha']:g} (val mean F1 off "
        f"{c['val_mean_f1']['off']:.1f}, on {c['val_mean_f1']['on']:.1f}; val hallucination % "
        f"off {c['val_hallucination']['off']:.1f}, on {c['val_hallucination']['on']:.1f})"
        for s in seeds
        for name, c in s["chosen"].items()
    )
    times = "; ".join(
        f"seed {s['seed']}: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items())
        for s in seeds
    )
    return "\n".join(
        [
            "# CPU hallucination testbed: guard off vs on (test split)",
            "",
            f"Seeds {results['seeds']}; {world['n_train']} training images with bias pairs "
            f"{[tuple(p) for p in world['bias_pairs']]} at rate {world['bias_rate']} "
            f"(measured P(B|A) in train: {rates}; in test: {test_rates}); "
            f"{world['n_val']} validation and {world['n_test']} test images, "
            f"{world['image_size']} px. Model trained ({config['recipe']['kind']} recipe; "
            f"instruction stage for llava) {training['steps']} steps, batch "
            f"{training['batch_size']}, lr {training['lr']}. Metrics in percent, mean ± sd over "
            "seeds; McNemar: exact test on the discordant pairs summed over seeds. "
            "Hallucination % = share of 'yes' to 'is there a B?' on test images with A but not B.",
            "",
            table(results),
            "",
            "Alpha chosen per variant on the validation split (highest guard-on mean F1):",
            "",
            chosen,
            "",
            "Per seed (the recipe's measurements):",
            "",
            recipe_lines(seeds),
            "",
            f"Wall time {results['seconds']:.0f} s with {results['threads']} torch thread(s) "
            f"(per seed, s: {times}).",
        ]
    )
