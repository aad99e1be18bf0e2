"""How strongly a lab world plants its causes: train (or load) the model per seed, read the
validation split. For choosing a world's settings before any test run.

    python benchmarks/testbed_plant.py --config world.json --seeds 0 1 2 --out runs/plant

Per seed: the model of ``benchmarks/testbed.py`` for the same configuration (same cache), its
accuracy, "yes" on "no" questions and recall on every validation question set (``bias`` and
``context``: the causes' hallucination and recall), and the diagnostic. Writes
``OUT/plant.json`` and prints a table; the logic is ``vlsae_guard.lab.testbed.diagnostic``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from vlsae_guard import outputs, provenance
from vlsae_guard.cli import bench_flags
from vlsae_guard.harness import common
from vlsae_guard.lab.testbed import diagnostic
from vlsae_guard.lab.testbed.experiment import ExperimentConfig
from vlsae_guard.lab.testbed.model import trained_model
from vlsae_guard.lab.testbed.world import build_world


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/testbed_plant.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", type=Path, help="JSON file of ExperimentConfig fields")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/plant"))
    p.add_argument("--cache", type=Path, default=Path("runs/testbed-cache"), help="trained models")
    p.add_argument("--images", type=int, default=48, help="diagnostic images per condition")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        config = ExperimentConfig()
        if args.config:
            try:
                config = ExperimentConfig.model_validate_json(args.config.read_text())
            except (OSError, ValidationError) as e:
                raise common.BenchmarkError(f"--config {args.config}: {e}") from e
        torch.set_num_threads(config.training.threads)
        seeds = []
        for seed in args.seeds:
            world = build_world(config.world, seed)
            model = trained_model(
                world, config.model, config.training, args.cache, lambda *_: None, config.recipe
            )
            seeds.append(
                {
                    "seed": seed,
                    "model_sha256": model.sha256,
                    "validation": diagnostic.planting(model.path, world),
                    "diagnostic": diagnostic.diagnose(model.path, world, args.images),
                }
            )
        out = {
            "config": config.model_dump(mode="json"),
            "seeds": seeds,
            "environment": provenance.environment(),
        }
        outputs.write_text(args.out / "plant.json", json.dumps(out, indent=2) + "\n")
        print(table(seeds))
        print(f"\nwrote {args.out / 'plant.json'}")
        return 0

    return bench_flags.run_main("benchmarks/testbed_plant.py", body)


def table(seeds: list[dict]) -> str:
    """Per seed: random-split accuracy, each cause's hallucination and recall (validation)."""
    lines = [
        "| seed | random acc. | co-occurrence: yes on no / recall | context: yes on no / recall |",
        "|---|---|---|---|",
    ]

    def cell(entry: dict | None) -> str:
        if entry is None:
            return "n/a"
        return " / ".join(
            "n/a" if v is None else f"{v:.1f}" for v in (entry["yes_on_no"], entry["recall"])
        )

    for s in seeds:
        v = s["validation"]
        lines.append(
            f"| {s['seed']} | {v['random']['accuracy']:.1f} | {cell(v.get('bias'))} | "
            f"{cell(v.get('context'))} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
