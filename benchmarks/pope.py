"""POPE with and without the VL-SAE guard: answers per arm, metrics, significance, plot.

    python benchmarks/pope.py --demo                      # offline, a lab model, ~80 s on a CPU
    python benchmarks/pope.py --model llava-hf/llava-1.5-7b-hf --sae DIR --ab \\
        --dataset coco_llava --images val2014/ --out runs/pope-7b

Answers are appended to ``OUT/answers/guard-{off,on}/SPLIT.jsonl`` as they are produced (rerun
the same command to resume a killed run); ``OUT/results.json``, ``results.md`` and
``results.png`` hold the metrics of both arms, the differences with paired bootstrap 95%
intervals and McNemar's exact p per split. Scoring lives in ``vlsae_guard.scoring.pope``.
"""

from __future__ import annotations

import sys

from vlsae_guard.cli import bench_flags
from vlsae_guard.harness import pope as harness
from vlsae_guard.lab import demo


def main(argv: list[str] | None = None) -> int:
    args = bench_flags.pope_parser().parse_args(argv)

    def body() -> int:
        if args.demo:
            _, text = demo.run_demo(bench_flags.demo_config(args))
            print(text)
            return 0
        config = bench_flags.pope_config(args)
        results = harness.run(config)
        table = harness.finish(results, config.out, "POPE: guard off vs on")
        bench_flags.report(table, results, harness.NOTES, config.out)
        return 0

    return bench_flags.run_main("benchmarks/pope.py", body)


if __name__ == "__main__":
    sys.exit(main())
