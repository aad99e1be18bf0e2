"""Concept-level evidence on a lab run's models: do the VL-SAE's concepts for B fire where B is?

    python benchmarks/testbed_evidence.py --run runs/testbed          # after benchmarks/testbed.py

For each seed of the run and each planted cause, the projector VL-SAE's concepts for B named two
ways (the word's text-side concepts; the vision concepts its image-caption pairs associate with
B) and the AUC of their activation between validation images with B and images with the cue
without B. Writes ``RUN/evidence.json`` and prints the table; the logic is
``vlsae_guard.lab.testbed.evidence``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlsae_guard import outputs, provenance
from vlsae_guard.cli import bench_flags
from vlsae_guard.lab.testbed.evidence import evidence
from vlsae_guard.lab.testbed.experiment import finished_run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/testbed_evidence.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--run", type=Path, default=Path("runs/testbed"), help="testbed.py --out")
    p.add_argument("--top", type=int, default=4, help="paired route: concepts per object")
    p.add_argument("--floor", type=float, default=0.9, help="regressed route: recall floor")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        run, per_seed = finished_run(args.run)
        torch.set_num_threads(args.threads)
        pairs = run["config"]["sae"]["pairs"]
        seeds = []
        for seed, record, world in per_seed:
            sae = record["sae"]["projector"]["path"]
            rows = evidence(record["model"]["path"], sae, world, pairs, args.top, args.floor)
            seeds.append({"seed": seed, "model_sha256": record["model"]["sha256"], "causes": rows})
        out = {
            "run": str(args.run),
            "top": args.top,
            "floor": args.floor,
            "seeds": seeds,
            "environment": provenance.environment(),
        }
        outputs.write_text(args.run / "evidence.json", json.dumps(out, indent=2) + "\n")
        print(table(seeds))
        print(f"\nwrote {args.run / 'evidence.json'}")
        return 0

    return bench_flags.run_main("benchmarks/testbed_evidence.py", body)


def table(seeds: list[dict]) -> str:
    """Per seed and cause: each route's concepts, how often they fire, and the AUC."""
    lines = [
        "| seed | cause | cue -> B | shared: concepts / fire / AUC"
        " | paired: concepts / fire / AUC | regressed: AUC / gate passes cue only / B |",
        "|---|---|---|---|---|---|",
    ]

    def cell(row: dict, route: str) -> str:
        value = row[f"{route}_auc"]
        auc = "n/a" if value is None else f"{value:.2f}"
        return f"{row[f'{route}_concepts']} / {row[f'{route}_fires']:.2f} / {auc}"

    for s in seeds:
        for r in s["causes"]:
            lines.append(
                f"| {s['seed']} | {r['cause']} | {r['cue']} -> {r['object']} | "
                f"{cell(r, 'shared')} | {cell(r, 'paired')} | {_gate(r)} |"
            )
    return "\n".join(lines)


def _gate(row: dict) -> str:
    def show(value):
        return "n/a" if value is None else f"{value:.2f}"

    keys = ("regressed_auc", "regressed_pass_cue", "regressed_pass_b")
    return " / ".join(show(row[k]) for k in keys)


if __name__ == "__main__":
    sys.exit(main())
