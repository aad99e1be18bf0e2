"""Encode + decode of one LLaVA-1.5-7B image (576 tokens x 4096): our VL-SAE vs the official code.

Both run in the same process on the same weights and inputs, interleaved with the floor: a bare
``x @ W_enc.T`` of the encoder's shape (an exact encode reads every concept once):

* ours: ``sae(x)``, i.e. ``encode_topk`` (one matmul against the encoder, top-k on the cosine,
  square root on the k winners only) and a sparse decode gathering k decoder rows per token;
* official: :mod:`vlsae_guard.core.reference`, written as the paper's code does it: ``torch.cdist``
  over all concepts, ``kthvalue`` thresholding, and a dense ``n_concepts x d`` decoder matmul;
* screened: :class:`~vlsae_guard.core.screen.ScreenedSearch` (``guard(..., search="screened")``),
  every cosine in bfloat16 first and only the concepts its certified bound cannot rule out
  recomputed in float32, then the same sparse decode.

Both are then compared to the same formulas evaluated in float64. In float32 the two pick
different concept sets only for tokens whose k-th and (k+1)-th cosines are closer than fp32
rounding (a near-tie at the k-th boundary): either choice is then as right as the other, and the
reconstruction differs by about one concept's contribution for those tokens.

Usage: ``python benchmarks/perf_sae.py [--tokens 576 --d 4096 --concepts 32768 --k 256]``, or on
a trained SAE and real rows: ``--sae DIR --inputs ROWS.pt`` (a ``tokens x d`` float tensor).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _timing import median_times
from torch import Tensor

from vlsae_guard import VLSAE, SAEConfig
from vlsae_guard.core import reference
from vlsae_guard.core.screen import ScreenedSearch


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
    p.add_argument(
        "--clusters", type=int, default=256, help="concept clusters of the pruning bound (0: skip)"
    )
    p.add_argument("--sae", default=None, help="a VL-SAE checkpoint instead of a random one")
    p.add_argument("--inputs", default=None, help="rows to encode (.pt) instead of random ones")
    return p.parse_args()


def prunable_share(x: Tensor, encoder: Tensor, k: int, clusters: int, seed: int) -> dict:
    """What an exact cluster-bound search could skip at best: the encoder's unit rows in
    ``clusters`` (spherical k-means, 10 rounds), a cluster skipped for a token when ``<x, c> + r``
    (unit centroid c, radius r = max ||w_j - c||) is below the token's true k-th cosine (an
    oracle threshold: a real search only has a lower bound of it)."""
    w = F.normalize(encoder, dim=-1)
    xs = F.normalize(x, dim=-1)
    gen = torch.Generator().manual_seed(seed)
    centroids = w[torch.randperm(len(w), generator=gen)[:clusters]].clone()
    for _ in range(10):
        assign = (w @ centroids.T).argmax(1)
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, w), dim=-1)
    assign = (w @ centroids.T).argmax(1)
    radius = torch.zeros(clusters).scatter_reduce_(
        0, assign, (w - centroids[assign]).norm(dim=-1), "amax"
    )
    kth = (xs @ w.T).topk(k, dim=-1).values[:, -1:]
    skipped = ((xs @ centroids.T + radius) < kth).float() @ torch.bincount(
        assign, minlength=clusters
    ).float()
    return {
        "share": float(skipped.mean() / len(w)),
        "radius": float(radius.median()),
        "kth": float(kth.median()),
    }


def selected(z: Tensor) -> Tensor:
    """Which concepts a dense top-k code keeps."""
    return z != 0


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.sae:
        sae = VLSAE.from_pretrained(args.sae).float().eval()
    else:
        sae = VLSAE(SAEConfig(d_in=args.d, n_concepts=args.concepts, k=args.k)).eval()
    if args.inputs:
        x = torch.load(args.inputs, weights_only=True).float().reshape(-1, sae.config.d_in)
    else:
        x = torch.randn(args.tokens, sae.config.d_in)
    k = sae.k
    search = ScreenedSearch(sae)
    enc, dec = sae.encoder.detach(), sae.vision_decoder
    w, b = dec.weight.detach(), dec.bias.detach()

    def official(x: Tensor = x, enc: Tensor = enc, w: Tensor = w, b: Tensor = b) -> Tensor:
        return reference.decode(reference.encode(x, enc, k), w, b)

    print(
        f"VL-SAE encode+decode, {len(x)} tokens x d={sae.config.d_in}, {sae.n_concepts} "
        f"concepts, k={k}, float32, CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )

    def floor(x: Tensor = x, enc: Tensor = enc) -> Tensor:
        return x @ enc.T  # the encoder's GEMM alone: what an exact encode cannot go below

    def screened(x: Tensor = x) -> Tensor:
        return sae.decode(search.encode_topk(x))

    with torch.inference_mode():
        (t_ours, y_ours), (t_ref, y_ref), (t_gemm, _), (t_scr, y_scr) = median_times(
            [lambda: sae(x), official, floor, screened], args.warmup, args.repeats
        )
        sets_ours = selected(sae.encode(x))
        sets_scr = selected(search.encode_topk(x).dense())
        sets_ref = selected(reference.encode(x, enc, k))
        y64 = official(x.double(), enc.double(), w.double(), b.double())
        sets64 = selected(reference.encode(x.double(), enc.double(), k))

    def same_rows(p: Tensor, q: Tensor) -> float:
        return (p == q).all(-1).double().mean().item()

    def max_diff(p: Tensor, q: Tensor) -> float:
        return (p.double() - q.double()).abs().max().item()

    n = f"median of {args.repeats} interleaved, {args.warmup} warm-up"
    rows = [
        ("ours     sae(x) [encode_topk + sparse decode]", f"{t_ours * 1e3:9.1f} ms  ({n})"),
        ("official cdist + kthvalue + dense decoder", f"{t_ref * 1e3:9.1f} ms  ({n})"),
        ("floor: bare GEMM x @ W_enc.T", f"{t_gemm * 1e3:9.1f} ms  ({n})"),
        ("screened bfloat16 screen + float32 rescoring", f"{t_scr * 1e3:9.1f} ms  ({n})"),
        ("speed-up official / ours", f"{t_ref / t_ours:9.2f} x"),
        ("ours / floor (goal <= 1.2)", f"{t_ours / t_gemm:9.2f} x"),
        ("official / floor", f"{t_ref / t_gemm:9.2f} x"),
        ("screened / floor", f"{t_scr / t_gemm:9.2f} x"),
        ("screened: concepts rescored per row", f"{search.stats.rescored_per_row:9.1f}"),
        ("screened: fell back to the full search", f"{search.stats.fell_back!s:>9}"),
        ("max |ours - official| reconstruction", f"{max_diff(y_ours, y_ref):9.2e}"),
        ("rows with identical concept sets", f"{same_rows(sets_ours, sets_ref):9.4f}"),
        ("max |ours - float64| reconstruction", f"{max_diff(y_ours, y64):9.2e}"),
        ("max |official - float64| reconstruction", f"{max_diff(y_ref, y64):9.2e}"),
        ("max |float64 reconstruction| (scale)", f"{y64.abs().max().item():9.2e}"),
        ("rows whose sets match float64: ours", f"{same_rows(sets_ours, sets64):9.4f}"),
        ("rows whose sets match float64: official", f"{same_rows(sets_ref, sets64):9.4f}"),
        ("rows whose sets match float64: screened", f"{same_rows(sets_scr, sets64):9.4f}"),
        ("max |screened - float64| reconstruction", f"{max_diff(y_scr, y64):9.2e}"),
    ]
    if args.clusters:
        with torch.inference_mode():
            pruned = prunable_share(x, enc, k, args.clusters, args.seed)
        rows.append(
            (
                f"concepts an exact {args.clusters}-cluster bound skips",
                f"{pruned['share']:9.4f}  (oracle; cluster radius {pruned['radius']:.2f}, "
                f"k-th cosine {pruned['kth']:.3f}, medians)",
            )
        )
    for label, value in rows:
        print(f"  {label:<48}{value}")
    print(
        "  (set differences are fp32 near-ties at the k-th boundary: both choices are equally\n"
        "   valid, and the reconstructions then differ by about one concept's contribution)"
    )


if __name__ == "__main__":
    main()
