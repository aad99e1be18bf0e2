"""Steering the lab's LLaVA from its vision tower with a Matryoshka SAE (the lab's stand-in for
Pach et al.'s steering score, with the objects in each image as the judge).

    python benchmarks/testbed_steer.py --seeds 0 1 2 --cache runs/testbed-cache --out runs/steer

Per seed: the lab model (trained, or from the cache benchmarks/testbed.py fills), a Matryoshka
SAE trained at the vision layer it reads, the reconstruction's cost on the test random set, and
per object the concept and clamp chosen on validation and the test "yes" rates on images
without the object, plain and steered. Writes ``OUT/steer.json`` and prints the table; the logic
is ``vlsae_guard.lab.testbed.steering``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlsae_guard import outputs, provenance
from vlsae_guard.cli import bench_flags
from vlsae_guard.lab.testbed.experiment import ExperimentConfig
from vlsae_guard.lab.testbed.steering import SteerLabConfig, run_seed, table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/testbed_steer.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/steer"))
    p.add_argument("--cache", type=Path, default=Path("runs/testbed-cache"), help="trained models")
    p.add_argument("--config", type=Path, help="JSON file of SteerLabConfig fields")
    p.add_argument("--fast", action="store_true", help="the lab's tiny configuration (tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        fields = json.loads(args.config.read_text()) if args.config else {}
        base = SteerLabConfig.fast() if args.fast else SteerLabConfig()
        config = SteerLabConfig(**{**base.model_dump(), **fields})
        experiment = ExperimentConfig.fast() if args.fast else ExperimentConfig()
        torch.set_num_threads(args.threads)
        seeds = [run_seed(experiment, config, s, args.out, args.cache, print) for s in args.seeds]
        out = {
            "benchmark": "vlsae-guard lab: steering at the vision tower",
            "config": config.model_dump(mode="json"),
            "experiment": experiment.model_dump(mode="json"),
            "threads": args.threads,
            "seeds": seeds,
            "environment": provenance.environment(),
        }
        outputs.write_text(args.out / "steer.json", json.dumps(out, indent=2) + "\n")
        print(table(seeds))
        print(f"\nwrote {args.out / 'steer.json'}")
        return 0

    return bench_flags.run_main("benchmarks/testbed_steer.py", body)


if __name__ == "__main__":
    sys.exit(main())
