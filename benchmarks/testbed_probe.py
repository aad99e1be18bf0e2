"""Linear probes on a testbed run's models: is the planted hallucination in the image tokens?

    python benchmarks/testbed_probe.py --run runs/testbed          # after benchmarks/testbed.py

For each seed of the run, a ridge probe per object on the mean projector output, trained on
fresh unbiased images of the same world (seed + 1000), read on the run's test images. Writes
``RUN/probe.json`` and prints the table; the logic is ``vlsae_guard.lab.testbed.probe``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vlsae_guard import outputs, provenance
from vlsae_guard.cli import bench_flags
from vlsae_guard.lab.testbed.experiment import finished_run
from vlsae_guard.lab.testbed.probe import probe


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/testbed_probe.py", description=__doc__.split("\n")[0]
    )
    p.add_argument("--run", type=Path, default=Path("runs/testbed"), help="testbed.py --out")
    p.add_argument("--images", type=int, default=1500, help="probe training images per seed")
    p.add_argument("--lam", type=float, default=0.01, help="ridge penalty per example")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        _, per_seed = finished_run(args.run)
        torch.set_num_threads(args.threads)
        seeds = []
        for seed, record, world in per_seed:
            result = probe(record["model"]["path"], world, args.images, args.lam)
            # (results before the lab: one cause, recorded as "hallucination")
            off = [
                t["causes"]["cooccurrence"]["off"] if "causes" in t else t["hallucination"]["off"]
                for t in record["test"].values()
            ]
            seeds.append({"seed": seed, "model_sha256": record["model"]["sha256"],
                          "model_hallucination_off": off[0], **result})  # fmt: skip
        out = {"run": str(args.run), "seeds": seeds, "environment": provenance.environment()}
        outputs.write_text(args.run / "probe.json", json.dumps(out, indent=2) + "\n")
        print(table(seeds))
        print(f"\nwrote {args.run / 'probe.json'}")
        return 0

    return bench_flags.run_main("benchmarks/testbed_probe.py", body)


def table(seeds: list[dict]) -> str:
    """Balanced probe accuracy per object; per bias pair A->B, how often the probe reads B on
    test images with A but no B, and on images with B; the model's hallucination rate."""
    names = list(seeds[0]["balanced_accuracy"])
    head = " | ".join(names)
    lines = [
        f"| seed | {head} | A->B: probe reads B (A without B / B present) | model: yes to B |",
        "|---" * (len(names) + 3) + "|",
    ]
    for s in seeds:
        pairs = "; ".join(
            f"{k} {v['reads_b_without_b']:.2f} / {v['reads_b_with_b']:.2f}"
            for k, v in s["bias_pairs"].items()
        )
        accs = " | ".join(f"{s['balanced_accuracy'][n]:.2f}" for n in names)
        lines.append(f"| {s['seed']} | {accs} | {pairs} | {s['model_hallucination_off']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
