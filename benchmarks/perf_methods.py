"""What each inference method costs at generation time: time per token relative to plain decoding.

On a LLaVA-shaped model built here (random weights, LLaVA-1.5's 576 image tokens, as in
perf_guard.py), every method of ``vlsae_guard.methods.METHODS`` (or ``--methods``) generates
greedily at each ``--new-tokens``, all methods interleaved, median of ``--repeats``. The length
is forced: the model's generation config gets no eos token, so ``model.generate`` and the fused
decoding engine both decode exactly N tokens (checked on every output). ``engine`` is plain
decoding through the fused engine on one arm: its cost beyond ``none`` is the engine's own.
SAE methods get a random VL-SAE (8 x hidden concepts; paper mode's at ``--layer``).

Goals (issue 15): two-arm methods (VCD-class) at most 2.1x plain; paper mode (KV cache) 2.2x.

Memory, one call each after the timing: CUDA ``max_memory_allocated``; CPU peak RSS (Linux
VmHWM, reset per call, glibc's mmap threshold pinned so freed tensors leave RSS).

Usage: ``python benchmarks/perf_methods.py [--new-tokens 64 512] [--methods none vcd]
[--device cuda --dtype float16] [--out runs/perf_methods.json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from _models import (
    engine_generate,
    git_commit,
    llava_shaped_sizes,
    peak_memory,
    pin_glibc_mmap_threshold,
    random_sae,
)
from _timing import median_times
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlsae_guard import GuardFitWarning, methods, outputs, provenance
from vlsae_guard.lab import tiny

PROMPT = "USER: <image>\nPlease describe this image in detail. ASSISTANT:"
ENGINE = "engine"  # not a method: plain decoding on the engine, one arm
NEEDS_OBJECT_MAP = {"cue-mask"}
GOALS = {"paper": 2.2}  # and 2.1 for every other two-arm method


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=list(methods.METHODS), default=None)
    p.add_argument("--new-tokens", type=int, nargs="+", default=[64, 512])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: float32 on CPU, float16 on CUDA")  # fmt: skip
    p.add_argument("--image-size", type=int, default=336, help="336: LLaVA-1.5")
    p.add_argument("--patch-size", type=int, default=14, help="336/14 -> 576 image tokens")
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--concepts", type=int, default=None, help="default: 8 x hidden")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--layer", type=int, default=None, help="paper mode; default: layers // 2")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=JSON",
                   help="a method setting, e.g. vcd.alpha=0.5 (repeatable)")  # fmt: skip
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/perf_methods.json"))
    args = p.parse_args(argv)
    # cue-mask reads an object map fitted on captioned images, which a random SAE has not; its
    # cost (one projector hook, as vlsae) is the lab's cost_ratio (docs/testbed.md)
    args.methods = args.methods or [m for m in methods.METHODS if m not in NEEDS_OBJECT_MAP]
    if set(args.methods) & NEEDS_OBJECT_MAP:
        p.error(f"--methods: {', '.join(NEEDS_OBJECT_MAP)} needs an object map; see the lab")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "float16")
    args.concepts = args.concepts or 8 * args.text_hidden
    args.layer = args.text_layers // 2 if args.layer is None else args.layer
    args.settings = {"paper": {"layer": args.layer}}
    for item in args.set:
        key, _, value = item.partition("=")
        method, _, field = key.partition(".")
        if method not in methods.METHODS or not field or not value:
            p.error(f"--set {item}: expected METHOD.FIELD=JSON with METHOD one of METHODS")
        args.settings.setdefault(method, {})[field] = json.loads(value)
    return args


def goal(name: str) -> float | None:
    spec = methods.METHODS.get(name)
    return GOALS.get(name, 2.1) if spec is not None and spec.arms == 2 else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore", GuardFitWarning)  # a random SAE fits nothing, by design
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sizes = llava_shaped_sizes(args)
    with tempfile.TemporaryDirectory() as tmp:
        directory = tiny.build_hf_llava(tmp, seed=args.seed, **sizes)
        model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype)
        processor = AutoProcessor.from_pretrained(directory)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # forced length: nothing ends a row early
    images = tiny.make_images(args.batch_size, seed=args.seed)
    batch = processor(images=images, text=[PROMPT] * args.batch_size, return_tensors="pt")
    inputs = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in batch.items()}
    prompt = inputs["input_ids"].shape[1]
    # One guard per model: each method is attached around its own calls, outside the timer.
    setups = {"none": partial(methods.attach, "none", model), ENGINE: partial(nullcontext, model)}
    errors, settings = {}, {}
    for name in [m for m in args.methods if m != "none"]:
        spec, given = methods.METHODS[name], args.settings.get(name, {})
        layer = given.get("layer")  # the SAE is trained where the method reads
        sae = random_sae(args.text_hidden, args.concepts, args.k, layer, args.seed)
        sae = sae.to(device) if spec.needs_sae else None
        try:
            methods.attach(name, model, sae, **given).remove()  # refusals before any timing
            settings[name] = methods.method_settings(name, **given).model_dump(mode="json")
            setups[name] = partial(methods.attach, name, model, sae, **given)
        except methods.MethodError as e:
            errors[name] = str(e)
            print(f"{name}: not measured: {e}", file=sys.stderr)

    def call(name: str, n: int):
        def run(handle):
            with torch.no_grad():
                kw = dict(**inputs, max_new_tokens=n, do_sample=False)
                out = engine_generate(handle, **kw) if name == ENGINE else handle.generate(**kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        return run

    results = []
    for n in args.new_tokens:
        print(f"{n} new tokens: {', '.join(setups)}", file=sys.stderr, flush=True)
        runs = [call(name, n) for name in setups]
        timed = median_times(runs, args.warmup, args.repeats, list(setups.values()))
        times = dict(zip(setups, timed, strict=True))
        plain_s, plain_ids = times["none"]
        for name, (seconds, ids) in times.items():
            if tuple(ids.shape) != (args.batch_size, prompt + n):
                raise AssertionError(f"{name}: {tuple(ids.shape)} is not {prompt} + {n} tokens")
            ratio, target = seconds / plain_s, goal(name)
            results.append({
                "method": name, "new_tokens": n, "seconds": seconds, "ratio": ratio,
                "ms_per_token": 1e3 * seconds / (n * args.batch_size), "goal": target,
                "within_goal": None if target is None else ratio <= target,
                "same_tokens_as_none": bool(torch.equal(ids, plain_ids)),
            })  # fmt: skip
    pinned = device.type == "cpu" and pin_glibc_mmap_threshold()
    for row in results:
        run = call(row["method"], row["new_tokens"])
        with setups[row["method"]]() as handle:
            _, row["peak_bytes"], row["rise_bytes"] = peak_memory(partial(run, handle), device)

    memory = (
        "torch.cuda.max_memory_allocated (peak; rise: above memory_allocated before the call)"
        if device.type == "cuda"
        else "CPU peak RSS: Linux VmHWM reset via /proc/self/clear_refs (rise: above VmRSS "
        f"before the call, glibc's free memory trimmed first); glibc mmap threshold pinned at "
        f"64 KiB: {pinned}"
    )
    record = {
        "benchmark": "benchmarks/perf_methods.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "environment": provenance.environment(),
        "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "model": {**sizes, "built": "lab.tiny.build_hf_llava, random weights", "seed": args.seed,
                  "prompt_tokens": prompt, "vocab": model.config.text_config.vocab_size},
        "sae": {"d_in": args.text_hidden, "concepts": args.concepts, "k": args.k,
                "shared": "every other concept", "paper_layer": args.layer},
        "batch_size": args.batch_size, "new_tokens": args.new_tokens, "warmup": args.warmup,
        "repeats": args.repeats, "decoding": "greedy; no eos token (forced length)",
        "timing": "median wall time per call, all methods interleaved, prefill included",
        "memory": memory, "settings": settings, "errors": errors, "results": results,
    }  # fmt: skip
    outputs.write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(header(args, record))
    print(table(results))
    print(f"\nwrote {args.out}")
    return 1 if errors else 0


def header(args: argparse.Namespace, record: dict) -> str:
    m = record["model"]
    return (
        f"LLaVA-shaped model: {m['prompt_tokens']} prompt tokens, LM hidden {args.text_hidden} x "
        f"{args.text_layers} layers; SAE {args.concepts} concepts, k={args.k}, paper layer "
        f"{args.layer}; {args.device} {args.dtype}, {record['threads']} threads, batch "
        f"{args.batch_size}, greedy, median of {args.repeats}; torch {torch.__version__}\n"
    )


def table(results: list[dict]) -> str:
    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.0f}"

    rows = [
        "| method | arms | new tokens | ms/token | × none | goal | same tokens as none "
        "| peak MiB | rise MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        spec = methods.METHODS.get(r["method"])
        arms = spec.arms if spec else 1
        met = "" if r["goal"] is None else (" met" if r["within_goal"] else " NOT met")
        goal_ = "—" if r["goal"] is None else f"≤ {r['goal']}×{met}"
        rows.append(
            f"| {r['method']} | {arms} | {r['new_tokens']} | {r['ms_per_token']:.1f} "
            f"| {r['ratio']:.2f} | {goal_} | {'yes' if r['same_tokens_as_none'] else 'no'} "
            f"| {mib(r['peak_bytes'])} | {mib(r['rise_bytes'])} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
