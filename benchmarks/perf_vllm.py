"""Throughput and latency of ``vlsae-guard serve``, guard on vs off, same requests, one server.

Every request carries its own switch (``mm_processor_kwargs``), so both arms run on the same
server process and the same images. Rounds alternate which arm goes first; each request has a
distinct image (the encoder cache keys on the image and the switch, so nothing is reused within
an arm) and a fixed answer length (``ignore_eos``). Goal: guarded throughput >= 0.95 of
unguarded.

Without ``--model``, a LLaVA-shaped model is built here (random weights, 576 image tokens, LM
hidden 256) with a VL-SAE of 8 x hidden concepts, k = 32. Per image token the guard costs
``d x 8d`` multiply-adds against the LM's ``~12 d^2`` per layer, a ratio of ``8 / (12 layers)``
whatever the width, so the default 32 layers (LLaVA-1.5-7B's depth) gives the 7B ratio at a
width a CPU can serve. On a GPU:

    python benchmarks/perf_vllm.py --model llava-hf/llava-1.5-7b-hf --sae DIR \\
        --requests 512 --concurrency 64 --max-tokens 64 -- --dtype float16

Arguments after ``--`` go to vLLM (``vlsae-guard serve``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _models import llava_shaped_sizes

from vlsae_guard import VLSAE, SAEConfig
from vlsae_guard.lab import tiny
from vlsae_guard.serving.client import chat_messages, openai_client, request_kwargs
from vlsae_guard.serving.server import running_server

PROMPT = "Please describe this image in detail."
CPU_ARGS = [
    "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30),
    "--limit-mm-per-prompt", '{"image": 1}',
]  # fmt: skip


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    vllm_args = argv[argv.index("--") + 1 :] if "--" in argv else None
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="LLaVA checkpoint (default: build a LLaVA-shaped one here)")
    p.add_argument("--sae", help="VL-SAE checkpoint (required with --model)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--requests", type=int, default=48, help="per arm")
    p.add_argument("--rounds", type=int, default=6, help="arms alternate first/second")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=32, help="32: LLaVA-1.5-7B's depth")
    p.add_argument("--concepts", type=int, default=None, help="default: 8 x hidden, as in 7B")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--timeout", type=float, default=900, help="server start-up, seconds")
    p.add_argument("--server-log", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.model and not args.sae:
        p.error("--model needs --sae")
    args.concepts = args.concepts or 8 * args.text_hidden
    return args, CPU_ARGS if vllm_args is None else vllm_args


def build(args: argparse.Namespace, directory: Path) -> tuple[str, str]:
    """A LLaVA-shaped checkpoint and an SAE for it (random weights), as in perf_guard.py."""
    sizes = llava_shaped_sizes(args)
    model = tiny.build_hf_llava(directory / "model", seed=args.seed, **sizes)
    torch.manual_seed(args.seed)
    config = SAEConfig(
        d_in=args.text_hidden,
        n_concepts=args.concepts,
        k=args.k,
        shared_concepts=list(range(0, args.concepts, 2)),
        source={"site": "projector"},
    )
    VLSAE(config).eval().save_pretrained(directory / "sae")
    return str(model), str(directory / "sae")


def run_arm(client, model: str, images, guard: bool, args) -> tuple[float, list[float]]:
    """Wall time of the whole arm and each request's latency (seconds)."""

    def one(image) -> float:
        start = time.perf_counter()
        client.chat.completions.create(
            model=model,
            messages=chat_messages(image, PROMPT),
            max_tokens=args.max_tokens,
            temperature=0,
            extra_body={**request_kwargs(guard), "ignore_eos": True},
        )
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        latencies = list(pool.map(one, images))
    return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else 0


def main() -> None:
    args, vllm_args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, sae = (args.model, args.sae) if args.model else build(args, Path(tmp))
        size = (args.image_size, args.image_size)
        per_round = max(1, args.requests // args.rounds)
        images = [
            tiny.make_images(per_round, seed=args.seed + 1 + r, size=size)
            for r in range(args.rounds)
        ]
        warmup = tiny.make_images(args.concurrency, seed=args.seed + 10_000, size=size)
        serve = ["--sae", sae, "--vlsae-alpha", str(args.alpha), "--seed", str(args.seed)]
        started = time.perf_counter()
        with running_server(
            model, [*serve, *vllm_args], timeout=args.timeout, log=args.server_log
        ) as server:
            print(f"server ready in {time.perf_counter() - started:.0f} s", flush=True)
            client = openai_client(server.base_url, timeout=600)
            name = client.models.list().data[0].id
            for guard in (True, False):
                run_arm(client, name, warmup, guard, args)
            wall = {True: 0.0, False: 0.0}
            latencies: dict[bool, list[float]] = {True: [], False: []}
            for r, batch in enumerate(images):
                for guard in (True, False) if r % 2 == 0 else (False, True):
                    seconds, lat = run_arm(client, name, batch, guard, args)
                    wall[guard] += seconds
                    latencies[guard] += lat
    print(table(args, wall, latencies, model if args.model else "built here"))


def table(args, wall: dict, latencies: dict, model: str) -> str:
    rows = [
        f"model: {model}; {len(latencies[True])} requests per arm in {args.rounds} rounds, "
        f"concurrency {args.concurrency}, {args.max_tokens} new tokens each",
        "",
        "| guard | requests/s | latency p50 | p90 | p99 |",
        "|---|---|---|---|---|",
    ]
    rate = {}
    for guard in (False, True):
        lat = latencies[guard]
        rate[guard] = len(lat) / wall[guard]
        p = [percentile(lat, q) * 1000 for q in (50, 90, 99)]
        rows.append(
            f"| {'on' if guard else 'off'} | {rate[guard]:.2f} | {p[0]:.0f} ms | {p[1]:.0f} ms "
            f"| {p[2]:.0f} ms |"
        )
    ratio = rate[True] / rate[False]
    verdict = "met" if ratio >= 0.95 else "NOT met"
    rows.append(f"\nthroughput on/off: {ratio:.3f} (goal >= 0.95: {verdict})")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
