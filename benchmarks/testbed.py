"""The CPU hallucination lab: two planted causes, every method measured against plain decoding.

    python benchmarks/testbed.py --seeds 0 1 2 --out runs/testbed      # ~25 min, 2-core CPU
    python benchmarks/testbed.py --fast --seeds 0 --out runs/testbed-fast   # under a minute
    python benchmarks/testbed.py --config benchmarks/configs/testbed-scratch-v1.json ...

Builds a generated world with a named co-occurrence and an unnamed visual context planted in
its training split, trains a small LLaVA on it with LLaVA's staged recipe (cached under --cache
by a hash of everything that decides its weights), reads the diagnostic and the probes off it,
trains VL-SAEs with the project's pipeline, chooses each method's settings (VL-SAE variants,
VCD, M3ID, PAI, DoLa) on the validation split and runs the POPE harness A/B on the test split.
Writes ``OUT/results.json`` (settings, hashes, choices with the validation numbers they were
made on, per-seed and pooled results, the ``summary`` rows, versions) and ``OUT/results.md``;
the logic lives in ``vlsae_guard.lab.testbed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from vlsae_guard import outputs
from vlsae_guard.cli import bench_flags
from vlsae_guard.harness import common
from vlsae_guard.lab.testbed import experiment, pooling


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/testbed.py", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("runs/testbed"))
    p.add_argument("--cache", type=Path, default=Path("runs/testbed-cache"), help="trained models")
    p.add_argument("--fast", action="store_true", help="tiny configuration (tests, demo)")
    p.add_argument("--config", type=Path, help="JSON file of ExperimentConfig fields")
    p.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.config and args.fast:
            raise common.BenchmarkError("give --config or --fast, not both")
        if args.config:
            try:
                config = experiment.ExperimentConfig.model_validate_json(args.config.read_text())
            except ValidationError as e:
                raise common.BenchmarkError(f"--config {args.config}: {e}") from e
        else:
            config = (
                experiment.ExperimentConfig.fast() if args.fast else experiment.ExperimentConfig()
            )
        log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
        results = experiment.run(config, args.seeds, args.out, args.cache, args.threads, log)
        results["command"] = [
            "benchmarks/testbed.py",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        text = pooling.report(results)
        outputs.write_text(args.out / "results.json", json.dumps(results, indent=2) + "\n")
        outputs.write_text(args.out / "results.md", text + "\n")
        print(text)
        print(f"\nwrote {args.out / 'results.json'} and results.md")
        return 0

    return bench_flags.run_main("benchmarks/testbed.py", body)


if __name__ == "__main__":
    sys.exit(main())
