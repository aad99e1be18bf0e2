"""Seeds pooled: the ``aggregate`` and ``summary`` of results.json, and results.md.

Independent worlds and models per seed, so metrics are averaged over seeds (mean ± sd) and
McNemar's exact test runs on the discordant pairs summed over seeds.
"""

from __future__ import annotations

import math

import numpy as np

from ...scoring.stats import mcnemar_p
from . import diagnostic
from .evaluation import METRICS
from .recipe import recipe_lines

SUMMARY_FIELDS = (
    "variant",
    "family",
    "cause",
    "settings",
    "hallucination_off",
    "hallucination_on",
    "n",
    "mcnemar_p",
    "f1_random_off",
    "f1_random_on",
    "accuracy_random_off",
    "recall_b_off",
    "recall_b_on",
    "cost_ratio",
)


def pooled_p(counts: list[dict]) -> float:
    """Exact McNemar on discordant pairs summed over seeds (independent worlds and models)."""
    return mcnemar_p({key: sum(c[key] for c in counts) for key in counts[0]})


def mean_sd(values: list[float]) -> dict:
    return {
        "mean": float(np.mean(values)),
        "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def runs_of(per_seed: list[dict], name: str) -> list[dict]:
    """One test run per seed of method ``name`` (``selected``: the variant validation chose)."""
    if name == "selected":
        return [s["test"][s["selected"]] for s in per_seed]
    return [s["test"][name] for s in per_seed]


def aggregate(per_seed: list[dict], names: list[str]) -> dict:
    """Per method and question set: metric means (and sd) over seeds, pooled McNemar p; per
    cause: hallucination and recall. The entry ``selected`` pools, per seed, the VL-SAE variant
    that validation selected."""
    out: dict = {}
    for name in [*names, "selected"]:
        runs = runs_of(per_seed, name)
        entry: dict = {"settings": [r["settings"] for r in runs], "splits": {}, "causes": {}}
        if name == "selected":
            entry["variants"] = [s["selected"] for s in per_seed]
        for kind in runs[0]["splits"]:
            splits = [r["splits"][kind] for r in runs]
            entry["splits"][kind] = {
                arm: {m: mean_sd([s[arm][m] for s in splits]) for m in METRICS}
                for arm in ("off", "on")
            }
            entry["splits"][kind]["n"] = sum(s["n"] for s in splits)
            entry["splits"][kind]["mcnemar_p"] = pooled_p([s["discordant"] for s in splits])
        for cause in runs[0]["causes"]:
            scores = [r["causes"][cause] for r in runs]
            entry["causes"][cause] = {
                "off": mean_sd([c["off"] for c in scores]),
                "on": mean_sd([c["on"] for c in scores]),
                "n": sum(c["n"] for c in scores),
                "mcnemar_p": pooled_p([c["discordant"] for c in scores]),
                "recall_off": _mean([c["recall_off"] for c in scores]),
                "recall_on": _mean([c["recall_on"] for c in scores]),
                "n_yes": sum(c["n_yes"] for c in scores),
            }
        out[name] = entry
    return out


def pooled_settings(settings: list[dict]) -> dict:
    """Settings over seeds: a value every seed shares as itself, one that validation chose
    differently per seed as the list of per-seed values."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    out = {}
    for key in keys:
        values = [s.get(key) for s in settings]
        out[key] = values[0] if all(v == values[0] for v in values) else values
    return out


def cost_ratio(run: dict, none_seconds: float | None) -> float | None:
    """The method's generation seconds over plain decoding's (``none``), on the same test
    questions of the same seed; None where an arm was resumed, not generated."""
    seconds = run["arm_seconds"].get(run["arms"][1])
    return seconds / none_seconds if seconds and none_seconds else None


def summary(per_seed: list[dict], names: list[str]) -> list[dict]:
    """One row per (method, cause) with exactly :data:`SUMMARY_FIELDS` (issue 16): means over
    seeds in percent, ``n`` and ``mcnemar_p`` pooled; ``variant == "selected"`` is the VL-SAE
    variant chosen on validation, per seed (its settings name the variant)."""
    rows, none_seconds = [], [s["none_seconds"] for s in per_seed]
    for name in [*names, "selected"]:
        runs = runs_of(per_seed, name)
        settings = [r["settings"] for r in runs]
        if name == "selected":
            settings = [
                {"variant": s["selected"], **x} for s, x in zip(per_seed, settings, strict=True)
            ]
        for cause in runs[0]["causes"]:
            scores = [r["causes"][cause] for r in runs]
            random = [r["splits"]["random"] for r in runs]
            rows.append(
                {
                    "variant": name,
                    "family": runs[0]["family"],
                    "cause": cause,
                    "settings": pooled_settings(settings),
                    "hallucination_off": _mean([c["off"] for c in scores]),
                    "hallucination_on": _mean([c["on"] for c in scores]),
                    "n": sum(c["n"] for c in scores),
                    "mcnemar_p": pooled_p([c["discordant"] for c in scores]),
                    "f1_random_off": _mean([x["off"]["f1"] for x in random]),
                    "f1_random_on": _mean([x["on"]["f1"] for x in random]),
                    "accuracy_random_off": _mean([x["off"]["accuracy"] for x in random]),
                    "recall_b_off": _mean([c["recall_off"] for c in scores]),
                    "recall_b_on": _mean([c["recall_on"] for c in scores]),
                    "cost_ratio": _mean(
                        [cost_ratio(r, t) for r, t in zip(runs, none_seconds, strict=True)]
                    ),
                }
            )
    return rows


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.1f}" + (f" ± {stat['sd']:.1f}" if stat["sd"] else "")


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_table(rows: list[dict]) -> str:
    """The summary rows as markdown: per method and cause, what issue 16 asks for."""
    lines = [
        "| method | family | cause | hallucination % off | on | n | McNemar p | recall on B % off"
        " | on | F1 random off | on | cost × none |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            _num(r["hallucination_off"]),
            _num(r["hallucination_on"]),
            str(r["n"]),
            f"{r['mcnemar_p']:.3g}",
            _num(r["recall_b_off"]),
            _num(r["recall_b_on"]),
            _num(r["f1_random_off"]),
            _num(r["f1_random_on"]),
            _num(r["cost_ratio"], 2),
        ]
        lines.append(
            f"| {r['variant']} | {r['family']} | {r['cause']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def table(results: dict) -> str:
    """The aggregate's POPE metrics per method and question set, as markdown."""
    lines = [
        "| method | question set | F1 off | F1 on | precision off | precision on | yes % off |"
        " yes % on | n | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["aggregate"].items():
        label = name
        if name == "selected":
            label = "selected on val: " + ", ".join(entry["variants"])
        for kind, s in entry["splits"].items():
            off, on = s["off"], s["on"]
            cells = [off["f1"], on["f1"], off["precision"], on["precision"]]
            cells += [off["yes_ratio"], on["yes_ratio"]]
            row = " | ".join(_cell(c) for c in cells)
            lines.append(f"| {label} | {kind} | {row} | {s['n']} | {s['mcnemar_p']:.3g} |")
    return "\n".join(lines)


def probe_lines(seeds: list[dict]) -> str:
    """Per seed and cause: how often the projector-output probe reads B where the cue is
    without B and where B is present, against the model's "yes" (guard off); for the stripes,
    how well the probe reads the cue itself."""
    lines = [
        "| seed | cause | cue -> B | probe reads B: cue without B | B present | cue decodable"
        " (balanced acc.) | model: yes to B % |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in seeds:
        p, test = s["probe"], next(iter(s["test"].values()))
        rows = [("cooccurrence", k, v) for k, v in p["bias_pairs"].items()]
        rows += [("context", k, v) for k, v in (p["context"] or {}).items()]
        for cause, key, r in rows:
            lines.append(
                f"| {s['seed']} | {cause} | {key} | {_num(r['reads_b_without_b'], 2)} | "
                f"{_num(r['reads_b_with_b'], 2)} | {_num(r.get('cue_balanced_accuracy'), 2)} | "
                f"{_num(test['causes'][cause]['off'])} |"
            )
    return "\n".join(lines)


def _context(c: str | None) -> str:
    return f"unnamed context: stripes -> {c}" if c else "no unnamed context cause"


def _rates(seeds: list[dict], split: str) -> str:
    return "; ".join(
        f"seed {s['seed']}: "
        + ", ".join(f"{k} {v}" for k, v in s["world"]["cooccurrence"][split].items())
        for s in seeds
    )


def report(results: dict) -> str:
    """results.md: what was run, the summary, the diagnostic, the tables, the choices with
    their validation numbers, the recipe's measurements and the time."""
    config = results["config"]
    world, training = config["world"], config["training"]
    seeds = results["per_seed"]
    chosen = "\n".join(
        f"- seed {s['seed']}, {name}: {c['settings']} (val mean F1 off "
        f"{c['val_mean_f1']['off']:.1f}, on {c['val_mean_f1']['on']:.1f})"
        for s in seeds
        for name, c in s["chosen"].items()
    )
    times = "; ".join(
        f"seed {s['seed']}: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items())
        for s in seeds
    )
    return "\n".join(
        [
            "# CPU hallucination lab: every method against none (test split)",
            "",
            f"Seeds {results['seeds']}; {world['n_train']} training images; named co-occurrence "
            f"{[tuple(p) for p in world['bias_pairs']]} at rate {world['bias_rate']}; "
            f"{_context(seeds[0]['world']['context_object'])} (measured in train: "
            f"{_rates(seeds, 'train')}; in test: {_rates(seeds, 'test')}); "
            f"{world['n_val']} validation and {world['n_test']} test images, "
            f"{world['image_size']} px. Model: {config['recipe']['kind']} recipe, "
            f"{training['steps']} instruction steps. Means over seeds in percent; McNemar: exact "
            "test on the discordant pairs summed over seeds. Hallucination % = share of 'yes' "
            "on a cause's 'no' questions; recall on B = share of 'yes' where B is present "
            "without its cue; cost = the method's generation seconds over plain decoding's.",
            "",
            summary_table(results["summary"]),
            "",
            'Diagnostic (mean P("Yes") for "Is there a B?", fresh images):',
            "",
            diagnostic.lines(seeds),
            "",
            "Linear probes on the projector output (fresh unbiased images; test split):",
            "",
            probe_lines(seeds),
            "",
            "POPE metrics per question set:",
            "",
            table(results),
            "",
            "Settings chosen per method on the validation split (highest guard-on mean F1):",
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
