"""Encode + decode of one LLaVA-1.5-7B image (576 tokens x 4096): our VL-SAE vs the official code.

Both run in the same process on the same weights and inputs:

* ours: ``sae(x)``, i.e. ``encode_topk`` (one matmul against the encoder, top-k on the cosine,
  square root on the k winners only) and a sparse decode gathering k decoder rows per token;
* official: :mod:`vlsae_guard.core.reference`, written as the paper's code does it: ``torch.cdist``
  over all concepts, ``kthvalue`` thresholding, and a dense ``n_concepts x d`` decoder matmul.

Both are then compared to the same formulas evaluated in float64. In float32 the two pick
different concept sets only for tokens whose k-th and (k+1)-th cosines are closer than fp32
rounding (a near-tie at the k-th boundary): either choice is then as right as the other, and the
reconstruction differs by about one concept's contribution for those tokens.

Usage: ``python benchmarks/perf_sae.py [--tokens 576 --d 4096 --concepts 32768 --k 256]``
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_times
from torch import Tensor

from vlsae_guard import VLSAE, SAEConfig
from vlsae_guard.core import reference


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=576, help="rows per call (576: one image)")
    p.add_argument("--d", type=int, default=4096, help="feature width (LLaVA-1.5-7B: 4096)")
    p.add_argument("--concepts", type=int, default=32768, help="SAE concepts")
    p.add_argument("--k", type=int, default=256, help="active concepts per token")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (the median is shown)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def selected(z: Tensor) -> Tensor:
    """Which concepts a dense top-k code keeps."""
    return z != 0


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = SAEConfig(d_in=args.d, n_concepts=args.concepts, k=args.k)
    sae = VLSAE(config).eval()
    x = torch.randn(args.tokens, args.d)
    enc, dec = sae.encoder.detach(), sae.vision_decoder
    w, b = dec.weight.detach(), dec.bias.detach()

    def official(x: Tensor = x, enc: Tensor = enc, w: Tensor = w, b: Tensor = b) -> Tensor:
        return reference.decode(reference.encode(x, enc, args.k), w, b)

    print(
        f"VL-SAE encode+decode, {args.tokens} tokens x d={args.d}, {args.concepts} concepts, "
        f"k={args.k}, float32, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    with torch.inference_mode():
        (t_ours, y_ours), (t_ref, y_ref) = median_times(
            [lambda: sae(x), official], args.warmup, args.repeats
        )
        sets_ours = selected(sae.encode(x))
        sets_ref = selected(reference.encode(x, enc, args.k))
        y64 = official(x.double(), enc.double(), w.double(), b.double())
        sets64 = selected(reference.encode(x.double(), enc.double(), args.k))

    def same_rows(p: Tensor, q: Tensor) -> float:
        return (p == q).all(-1).double().mean().item()

    def max_diff(p: Tensor, q: Tensor) -> float:
        return (p.double() - q.double()).abs().max().item()

    n = f"median of {args.repeats} interleaved, {args.warmup} warm-up"
    rows = [
        ("ours     sae(x) [encode_topk + sparse decode]", f"{t_ours * 1e3:9.1f} ms  ({n})"),
        ("official cdist + kthvalue + dense decoder", f"{t_ref * 1e3:9.1f} ms  ({n})"),
        ("speed-up official / ours", f"{t_ref / t_ours:9.2f} x"),
        ("max |ours - official| reconstruction", f"{max_diff(y_ours, y_ref):9.2e}"),
        ("rows with identical concept sets", f"{same_rows(sets_ours, sets_ref):9.4f}"),
        ("max |ours - float64| reconstruction", f"{max_diff(y_ours, y64):9.2e}"),
        ("max |official - float64| reconstruction", f"{max_diff(y_ref, y64):9.2e}"),
        ("max |float64 reconstruction| (scale)", f"{y64.abs().max().item():9.2e}"),
        ("rows whose sets match float64: ours", f"{same_rows(sets_ours, sets64):9.4f}"),
        ("rows whose sets match float64: official", f"{same_rows(sets_ref, sets64):9.4f}"),
    ]
    for label, value in rows:
        print(f"  {label:<48}{value}")
    print(
        "  (set differences are fp32 near-ties at the k-th boundary: both choices are equally\n"
        "   valid, and the reconstructions then differ by about one concept's contribution)"
    )


if __name__ == "__main__":
    main()
