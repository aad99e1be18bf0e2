"""What the guard costs at generation time, measured side by side in one run.

1. Projector mode: greedy generation latency guarded vs unguarded on a small LLaVA built here
   (random weights, LLaVA-1.5's 576 image tokens), plus the FLOP projection of the same ratio
   for LLaVA-1.5-7B with the released VL-SAE size (goal: <= 1.02 end to end).
2. Paper mode: the KV-cached implementation vs ``exact=True`` (the official semantics: the whole
   sequence re-run every step) at 64, 256 and 512 new tokens (goal: >= 20x at 512).
3. The projector hook's share of a LLaVA-1.5-7B prefill, measured: a one-layer LLaVA whose text
   layer is 7B-wide (4096 hidden, 11008 intermediate, 32 heads) prefills 576 image tokens and
   its prompt; the guard's hook (the released VL-SAE's size, 32768 concepts, k 256) against
   that decoder layer's time, times 32 layers (goal: <= 1.5%), with the full and the screened
   top-k search (``search="screened"``, :mod:`vlsae_guard.core.screen`).

Usage: ``python benchmarks/perf_guard.py [--steps 64 256 512] [--text-hidden 256 ...]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from _models import llava_shaped_sizes
from _timing import median_times
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlsae_guard import VLSAE, SAEConfig, guard
from vlsae_guard.lab import tiny

PROMPT = "USER: <image>\nPlease describe this image in detail. ASSISTANT:"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=336, help="vision input (336: LLaVA-1.5)")
    p.add_argument("--patch-size", type=int, default=14, help="336/14 -> 576 image tokens")
    p.add_argument("--text-hidden", type=int, default=256)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--concepts", type=int, default=4096, help="SAE concepts (8 x hidden)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--projector-tokens", type=int, default=32, help="new tokens, part 1")
    p.add_argument("--steps", type=int, nargs="+", default=[64, 256, 512], help="part 2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-7b", action="store_true", help="leave out part 3 (about 5 GB)")
    return p.parse_args()


def llava_with_prompt(sizes: dict[str, int], seed: int) -> tuple[torch.nn.Module, dict]:
    """A random-weight LLaVA of these sizes and the processed PROMPT with one image."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = tiny.build_hf_llava(tmp, seed=seed, **sizes)
        model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
        processor = AutoProcessor.from_pretrained(directory)
    images = tiny.make_images(1, seed=seed)
    return model, dict(processor(images=images, text=[PROMPT], return_tensors="pt"))


def projected_7b_ratio(new_tokens: int) -> float:
    """End-to-end FLOP ratio guarded / unguarded for LLaVA-1.5-7B + the released VL-SAE.

    Unguarded: CLIP ViT-L/14-336 (0.30 B params) over 577 tokens, the 2-layer projector, and
    the 6.7 B-parameter LM over ~640 prompt tokens plus ``new_tokens`` decoded ones (2 FLOP per
    parameter per token). Guard: the encoder matmul 576 x 4096 x 32768 (the top-k and the
    256-row sparse decode are below 1% of it).
    """
    vision = 2 * 0.30e9 * 577
    projector = 2 * 576 * (1024 * 4096 + 4096 * 4096)
    lm = 2 * 6.7e9 * (640 + new_tokens)
    guard_cost = 2 * 576 * 4096 * 32768 + 2 * 576 * 256 * 4096
    base = vision + projector + lm
    return (base + guard_cost) / base


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, inputs = llava_with_prompt(llava_shaped_sizes(args), args.seed)
    torch.manual_seed(args.seed)
    sae = VLSAE(SAEConfig(d_in=args.text_hidden, n_concepts=args.concepts, k=args.k)).eval()
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())

    def generate(runner, steps: int, **kw):
        with torch.no_grad():
            return runner(
                **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kw
            )

    print(
        f"LLaVA-shaped model: {n_image} image tokens, LM hidden {args.text_hidden} x "
        f"{args.text_layers} layers; SAE {args.concepts} concepts, k={args.k}; "
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    handle = guard(model, sae, alpha=1.0, shared_concepts=list(range(0, args.concepts, 2)))
    n = args.projector_tokens

    def guarded():
        return generate(model.generate, n)

    def plain():
        with handle.disabled():
            return generate(model.generate, n)

    (t_on, _), (t_off, _) = median_times([guarded, plain], 1, args.repeats)
    handle.remove()
    print(f"\n1. projector mode, greedy, {n} new tokens (median of {args.repeats}, interleaved)")
    print(
        f"   unguarded {t_off * 1e3:9.1f} ms   guarded {t_on * 1e3:9.1f} ms   "
        f"ratio {t_on / t_off:.3f}"
    )
    for steps in (1, 64, 512):
        print(
            f"   LLaVA-1.5-7B FLOP projection, {steps:>3} new tokens: ratio "
            f"{projected_7b_ratio(steps):.4f}"
        )

    print("\n2. paper mode: KV cache vs exact=True (full re-run per step), one run each")
    print(
        f"   {'new tokens':>10} {'cached s':>10} {'exact s':>10} {'speed-up':>9} "
        f"{'same tokens':>12}"
    )
    for steps in args.steps:
        results = []
        for exact in (False, True):
            with guard(model, sae, mode="paper", layer=args.text_layers // 2, exact=exact) as paper:
                ((t, out),) = median_times([lambda p=paper, s=steps: generate(p.generate, s)], 0, 1)
            results.append((t, out))
        (t_cached, cached), (t_exact, exact_out) = results
        first = int(cached[0, -steps] == exact_out[0, -steps])
        same = (cached[0, -steps:] == exact_out[0, -steps:]).float().mean().item()
        print(
            f"   {steps:>10} {t_cached:>10.2f} {t_exact:>10.2f} {t_exact / t_cached:>8.1f}x "
            f"{same:>11.0%}  (first token equal: {bool(first)})"
        )
    print(
        "   (after the first token the two differ by design: the cached run keeps each\n"
        "    earlier position's shift from its own step, the exact run re-shifts them all)"
    )
    if not args.skip_7b:
        hook_share(args)


def hook_share(args: argparse.Namespace) -> None:
    """Part 3: the decoder layer's time and the guard hook's, in the same forwards: forward
    hooks on the projector just before and just after the guard's bracket what it runs."""
    from vlsae_guard.backends import detect

    sizes = dict(image_size=336, patch_size=14, text_hidden=4096, text_intermediate=11008,
                 text_layers=1, text_heads=32)  # fmt: skip
    model, inputs = llava_with_prompt(sizes, args.seed)
    sae = VLSAE(SAEConfig(d_in=4096, n_concepts=32768, k=256)).eval()
    backend = detect(model)
    layer_module, projector = backend.decoder_layers()[0], backend.projector()
    spans: dict[str, list[float]] = {"layer": [], "hook": []}
    started: dict[str, float] = {}

    def start(name: str):
        return lambda *_: started.update({name: time.perf_counter()})

    def stop(name: str):
        return lambda *_: spans[name].append(time.perf_counter() - started[name])

    hooks = [
        layer_module.register_forward_pre_hook(start("layer")),
        layer_module.register_forward_hook(stop("layer")),
    ]
    shared = list(range(0, 32768, 2))
    tokens = inputs["input_ids"].shape[1]
    print(
        f"\n3. LLaVA-1.5-7B prefill ({tokens} tokens, 576 of them image), measured on a one-layer"
    )
    print("   model with a 7B-wide text layer; the guard's own projector hook timed in place")
    for search in ("full", "screened"):
        spans["layer"].clear()
        spans["hook"].clear()
        handle = guard(model, sae, alpha=1.0, shared_concepts=shared, search=search)
        with warnings.catch_warnings(), handle:
            warnings.simplefilter("ignore")  # a random SAE's fit warning: its cost is timed
            timers = [
                projector.register_forward_hook(start("hook"), prepend=True),  # before the guard
                projector.register_forward_hook(stop("hook")),  # after it
            ]
            with torch.no_grad():
                for _ in range(1 + args.repeats):
                    model(**inputs)
        for h in timers:
            h.remove()
        layer = statistics.median(spans["layer"][1:])
        hook_s = statistics.median(spans["hook"][1:])
        share = 100 * hook_s / (32 * layer)
        screen = handle.intervention.search
        rescored = (
            f", {screen.stats.rescored_per_row:.0f} concepts rescored/token" if screen else ""
        )
        print(
            f"   search={search:<9} decoder layer {layer:6.2f} s   hook {hook_s:6.2f} s   "
            f"hook / (32 x layer) = {share:.2f}%   (median of {args.repeats}{rescored})"
        )
    for h in hooks:
        h.remove()


if __name__ == "__main__":
    main()
