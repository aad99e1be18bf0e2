"""Every method on the testbed, each at settings chosen on the validation split.

Two families run through the same POPE harness A/B (arm ``none`` against the method): the VL-SAE
*variants* (projector ``replace`` / ``edit`` / ``replace`` + text-grounded, and paper mode),
each over a grid of alphas, and the *peers* of the fused-decoding engine (VCD, M3ID, PAI, DoLa),
each over a small grid of its own settings. :func:`choose` keeps, per method, the candidate with
the highest guard-on mean F1 over the validation question sets, a function of validation
numbers only; the test split then runs each method once, at that choice.

Per run and planted cause: the hallucination rate (share of "yes" on the cause's "no"
questions), the recall on its "yes" questions (B present without its cue: a method that only
says "no" more often loses it), and McNemar on the hallucination questions.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ...core.intervention import GuardConfig
from ...harness import common
from ...harness import pope as pope_harness
from ...harness.config import PopeRunConfig
from ...methods import MethodError, method_settings
from ...scoring.stats import discordant, mcnemar_p
from ...validation import FrozenSettings

METRICS = ("f1", "precision", "recall", "accuracy", "yes_ratio")
PEER_METHODS = ("vcd", "m3id", "pai", "dola")


class Variant(FrozenSettings):
    """One way of guarding with the VL-SAE; its alpha (cue-mask: its ``grid`` of settings) is
    chosen on the validation split."""

    name: str
    mode: Literal["projector", "paper", "cue-mask"] = "projector"
    rewrite: Literal["replace", "edit"] = "replace"
    text_grounded: bool = False
    grid: tuple[dict[str, Any], ...] = ()  # cue-mask: GuardConfig fields per candidate

    @model_validator(mode="after")
    def _check(self) -> Variant:
        if (self.mode == "cue-mask") != bool(self.grid):
            raise ValueError(f"variant {self.name}: a grid is cue-mask's, and cue-mask needs one")
        for fields in self.grid:
            GuardConfig(mode="cue-mask", **fields)
        return self

    def candidates(self, alphas: tuple[float, ...]) -> list[dict]:
        """The settings validation chooses among (recorded as they are)."""
        if self.mode == "cue-mask":
            return [{"mode": "cue-mask", **fields} for fields in self.grid]
        if self.mode == "paper":
            return [{"mode": "paper", "alpha": alpha} for alpha in alphas]
        fields = self.model_dump(exclude={"name", "grid"})
        return [{**fields, "alpha": alpha} for alpha in alphas]

    def guard(self, settings: dict, layer: int) -> GuardConfig:
        """This variant's guard at one of its candidate ``settings`` (paper mode at ``layer``)."""
        return GuardConfig(**settings, **({"layer": layer} if self.mode == "paper" else {}))


class Peer(FrozenSettings):
    """A method of the fused-decoding engine and the settings validation chooses among."""

    method: Literal[PEER_METHODS]
    grid: tuple[dict[str, Any], ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Peer:
        for fields in self.grid:
            try:
                method_settings(self.method, **fields)
            except MethodError as e:
                raise ValueError(f"grid of {self.method}: {e}") from e
        return self

    @property
    def name(self) -> str:
        return self.method


DEFAULT_VARIANTS = (
    Variant(name="replace"),
    Variant(name="edit", rewrite="edit"),
    Variant(name="replace+text", text_grounded=True),
    Variant(name="paper", mode="paper"),
    # The map's cue statistics at GuardConfig's defaults; how sure a cue must be, how much of
    # it is masked and what fills it, chosen on validation.
    Variant(
        name="cue-mask",
        mode="cue-mask",
        grid=tuple(
            {"recall_floor": r, "token_share": t, "fill": f}
            for f in ("concept-free", "background")
            for r in (0.9, 0.98)
            for t in (0.0, 0.5)
        ),
    ),
)
# Each method's published default first, then one stronger setting; PAI and DoLa's layers fit
# the lab's 2-layer language model (PAI's released start layer is 2 of 32).
DEFAULT_PEERS = (
    Peer(method="vcd", grid=({"alpha": 1.0}, {"alpha": 0.5})),
    Peer(method="m3id", grid=({"lam": 0.02}, {"lam": 0.5})),
    Peer(method="pai", grid=({"alpha": 0.2, "start_layer": 1}, {"alpha": 0.5, "start_layer": 0})),
    Peer(method="dola", grid=({"layers": "low"}, {"layers": "high"})),
)


class EvalConfig(FrozenSettings):
    variants: tuple[Variant, ...] = DEFAULT_VARIANTS
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0)
    peers: tuple[Peer, ...] = DEFAULT_PEERS
    batch_size: int = Field(default=64, ge=1)
    bootstrap: int = Field(default=1000, ge=1)  # paired bootstrap replicates per split
    diagnostic_images: int = Field(default=64, ge=1)  # per cause and condition
    probe_images: int = Field(default=1500, ge=8)  # fresh unbiased images the probes learn on

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        names = [v.name for v in self.variants] + [p.name for p in self.peers]
        if len(set(names)) != len(names) or not self.variants:
            raise ValueError(f"need at least one variant and distinct names, got {names}")
        if "selected" in names:
            raise ValueError("'selected' names the variant chosen on validation; rename it")
        if not self.alphas or any(not 0 < a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be in (0, 1], got {self.alphas}")
        return self


@dataclass(frozen=True)
class Candidate:
    """One method at one setting: what the harness runs and what results record."""

    name: str  # the variant or peer
    family: Literal["vlsae", "peer"]
    settings: dict  # recorded, and compared across seeds in the summary
    run: dict = field(repr=False)  # PopeRunConfig fields


def candidates(evaluation: EvalConfig, saes: dict[str, Path], layer: int) -> list[list[Candidate]]:
    """Per method (variants, then peers), its candidates in grid order."""
    out = []
    for v in evaluation.variants:
        sae = str(saes[f"layer:{layer}" if v.mode == "paper" else "projector"])
        out.append(
            [
                Candidate(v.name, "vlsae", fields, {"sae": sae, "guard": v.guard(fields, layer)})
                for fields in v.candidates(evaluation.alphas)
            ]
        )
    for p in evaluation.peers:
        out.append(
            [
                Candidate(
                    p.name,
                    "peer",
                    dict(fields),
                    {"method": p.method, "method_settings": {p.method: fields}},
                )
                for fields in p.grid
            ]
        )
    return out


def ab(
    model_dir: Path,
    candidate: Candidate,
    files: dict[str, Path],
    sets: tuple[str, ...],
    causes: dict[str, str],
    out: Path,
    evaluation: EvalConfig,
    seed: int,
    baseline: Path | None = None,
) -> dict:
    """One POPE harness A/B (``none`` against the candidate) on the question ``sets``; its
    per-set scores, each cause's hallucination and recall, and each arm's seconds.

    ``baseline``: an earlier run's output directory with the same model and questions, whose
    ``none`` answers are reused (the harness's settings check refuses them if anything they
    depend on differs)."""
    run = PopeRunConfig(
        model=str(model_dir),
        backend="hf",
        prompt_format="chat-template",
        ab=True,
        images=files["images"],
        questions=[str(files[kind]) for kind in sets],
        out=out,
        batch_size=evaluation.batch_size,
        seed=seed,
        max_new_tokens=3,
        dtype="float32",
        device="cpu",
        bootstrap=evaluation.bootstrap,
        **candidate.run,
    )
    if baseline is not None:
        _reuse_off_arm(baseline, out)
    results = pope_harness.run(run, progress=False)
    off, on = results["arms"]
    splits = {}
    for kind in sets:
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
        "name": candidate.name,
        "family": candidate.family,
        "settings": candidate.settings,
        "arms": [off, on],
        "splits": splits,
        "causes": {
            cause: cause_scores(out / "paired" / f"{kind}.jsonl", off, on)
            for cause, kind in causes.items()
        },
        "arm_seconds": results["settings"]["arm_seconds"],
    }


def _reuse_off_arm(baseline: Path, out: Path) -> None:
    source = common.answers_dir(baseline, "none")
    target = common.answers_dir(out, "none")
    if source.is_dir() and not target.exists():
        shutil.copytree(source, target)


def cause_scores(paired: Path, arm_off: str = "none", arm_on: str = "vlsae") -> dict:
    """On one cause's question set: the hallucination rate (share of "yes" on its "no"
    questions) off and on with McNemar on them, and the recall on its "yes" questions."""
    rows = [json.loads(line) for line in paired.read_text().splitlines()]
    no = [r for r in rows if r["label"] == "no"]
    yes = [r for r in rows if r["label"] == "yes"]
    off = [r[f"pred_{arm_off}"] == "yes" for r in no]
    on = [r[f"pred_{arm_on}"] == "yes" for r in no]
    # correct = "no"; discordant counts in the harness's a/b naming (a = off, b = on)
    pairs = discordant([not x for x in off], [not x for x in on])

    def share(flags: list[bool]) -> float:
        return 100 * sum(flags) / len(flags) if flags else float("nan")

    return {
        "n": len(no),
        "off": share(off),
        "on": share(on),
        "discordant": pairs,
        "mcnemar_p": mcnemar_p(pairs),
        "n_yes": len(yes),
        "recall_off": share([r[f"pred_{arm_off}"] == "yes" for r in yes]),
        "recall_on": share([r[f"pred_{arm_on}"] == "yes" for r in yes]),
    }


def summary_scores(run: dict) -> dict:
    """What selection sees of a validation run: both arms' F1 per set, their mean, and each
    cause's hallucination rate."""
    f1 = {arm: {k: s[arm]["f1"] for k, s in run["splits"].items()} for arm in ("off", "on")}
    return {
        "f1": f1,
        "mean_f1": {arm: float(np.mean(list(v.values()))) for arm, v in f1.items()},
        "hallucination": {
            cause: {arm: c[arm] for arm in ("off", "on")} for cause, c in run["causes"].items()
        },
    }


def choose(validation: list[dict]) -> dict[str, dict]:
    """Per method, the validation run with the highest guard-on mean F1 over the question sets
    (ties: the earlier candidate in the grid). Takes validation numbers only, so the test
    split cannot influence the choice."""
    best: dict[str, dict] = {}
    for run in validation:  # in grid order
        current = best.get(run["name"])
        if current is None or run["mean_f1"]["on"] > current["mean_f1"]["on"]:
            best[run["name"]] = run
    return {
        name: {
            "family": r["family"],
            "settings": r["settings"],
            "val_mean_f1": r["mean_f1"],
            "val_hallucination": r["hallucination"],
        }
        for name, r in best.items()
    }


def select(chosen: dict[str, dict]) -> str:
    """The VL-SAE variant with the best validation mean F1 at its chosen alpha (ties: the first
    variant)."""
    variants = [name for name, c in chosen.items() if c["family"] == "vlsae"]
    return max(variants, key=lambda name: chosen[name]["val_mean_f1"]["on"])
