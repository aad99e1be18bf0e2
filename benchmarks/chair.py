"""CHAIR with and without the VL-SAE guard: captions per arm, metrics, intervals, plot.

    python benchmarks/chair.py --model llava-hf/llava-1.5-7b-hf --sae DIR --ab \\
        --images val2014/ --out runs/chair-7b            # 500 images, max_new_tokens 512

Captions are appended to ``OUT/answers/guard-{off,on}/chair500.jsonl`` as they are produced
(rerun to resume); ``OUT/results.json``, ``results.md``, ``results.png`` hold CHAIR_s, CHAIR_i,
Recall and Len of both arms and the differences with paired bootstrap 95% intervals;
``OUT/chair_details_guard-*.jsonl`` the mentions and hallucinations of every caption. Scoring
lives in ``vlsae_guard.scoring.chair``.
"""

from __future__ import annotations

import sys

from vlsae_guard.cli import bench_flags
from vlsae_guard.harness import chair as harness


def main(argv: list[str] | None = None) -> int:
    args = bench_flags.chair_parser().parse_args(argv)

    def body() -> int:
        config = bench_flags.chair_config(args)
        results = harness.run(config)
        bench_flags.report(harness.finish(results, config.out), results, harness.NOTES, config.out)
        return 0

    return bench_flags.run_main("benchmarks/chair.py", body)


if __name__ == "__main__":
    sys.exit(main())
