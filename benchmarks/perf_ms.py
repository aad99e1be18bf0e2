"""Monosemanticity score: closed form against the pairwise loop, then closed form at scale.

1. N = 2,000 images, K concepts (default 512), D = 768 embedding dims: the pairwise loop over
   ``n < m`` (:func:`pairwise_monosemanticity`, the reference code's algorithm, O(N^2 K)) and the
   closed form (dense, chunked over concepts; and on the torch sparse matrix), same data.
2. N = 50,000 images x K = 32,768 concepts, closed form only: the activations are TopK codes
   (``--nnz`` non-zero concepts per image, e.g. one k = 256 code per image of a mean-pooled
   store) generated and streamed in image batches into :class:`MSAccumulator`, never as the
   6.5 GB dense matrix. Reports time and peak memory (process max RSS), checks a sample of
   concepts against the dense closed form, and times one dense K-chunk to show what the dense
   path would cost.

Activations are synthetic (random TopK codes with a planted cluster structure so scores are
spread); embeddings are random unit vectors plus cluster directions. Timings exclude the SAE's
own encoding pass (see perf_sae.py).

Usage: ``python benchmarks/perf_ms.py [--small-n 2000 --small-k 512 --n 50000 --k 32768]``
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from vlsae_guard.concepts import MSAccumulator, monosemanticity_score, pairwise_monosemanticity


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small-n", type=int, default=2000, help="images, part 1")
    p.add_argument("--small-k", type=int, default=512, help="concepts, part 1")
    p.add_argument("--n", type=int, default=50_000, help="images, part 2")
    p.add_argument("--k", type=int, default=32_768, help="concepts, part 2")
    p.add_argument("--d", type=int, default=768, help="embedding width (CLIP ViT-L/14: 768)")
    p.add_argument("--nnz", type=int, default=256, help="non-zero concepts per image, part 2")
    p.add_argument("--batch", type=int, default=2048, help="images per streamed batch")
    p.add_argument("--clusters", type=int, default=64, help="planted image clusters")
    p.add_argument("--check", type=int, default=64, help="concepts checked densely, part 2")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Synthetic:
    """Images in clusters; concept ``c`` prefers cluster ``c % clusters``."""

    def __init__(self, k: int, d: int, clusters: int, nnz: int, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.k, self.d, self.clusters, self.nnz = k, d, clusters, nnz
        self.centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=self.gen))

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparse COO n x k activations, n x d embeddings)."""
        g = self.gen
        cluster = torch.randint(0, self.clusters, (n,), generator=g)
        emb = 2 * self.centres[cluster] + torch.randn(n, self.d, generator=g) / self.d**0.5
        # Half of each image's concepts come from its cluster's concepts, half at random.
        per = self.k // self.clusters
        own = cluster.unsqueeze(1) + self.clusters * torch.randint(
            0, per, (n, self.nnz // 2), generator=g
        )
        rand = torch.randint(0, self.k, (n, self.nnz - self.nnz // 2), generator=g)
        cols = torch.cat([own, rand], 1)
        vals = torch.rand(n, self.nnz, generator=g) + 0.1
        rows = torch.arange(n).unsqueeze(1).expand_as(cols)
        acts = torch.sparse_coo_tensor(
            torch.stack([rows.flatten(), cols.flatten()]),
            vals.flatten(),
            (n, self.k),
            check_invariants=False,
        ).coalesce()  # duplicate (row, col) pairs add up
        return acts, emb


def part1(args) -> None:
    data = Synthetic(args.small_k, args.d, args.clusters, max(8, args.small_k // 16), args.seed)
    acts, emb = data.batch(args.small_n)
    dense = acts.to_dense()
    print(
        f"part 1: N = {args.small_n} images, K = {args.small_k} concepts, D = {args.d}; "
        f"{acts._nnz() / args.small_n:.0f} non-zero per image"
    )
    runs = {}
    for name, fn in (
        ("pairwise loop (n < m)", lambda: pairwise_monosemanticity(dense, emb)),
        ("closed form, dense", lambda: monosemanticity_score(dense, emb)),
        ("closed form, sparse", lambda: monosemanticity_score(acts, emb)),
    ):
        start = time.perf_counter()
        runs[name] = (fn(), time.perf_counter() - start)
    ref, ref_time = runs["pairwise loop (n < m)"]
    alive = ~torch.isnan(ref)
    for name, (scores, seconds) in runs.items():
        diff = (scores - ref)[alive].abs().max().item()
        same_dead = bool((torch.isnan(scores) == ~alive).all())
        print(
            f"  {name:<22} {seconds:9.3f} s  x{ref_time / seconds:8.1f}  "
            f"max |diff| {diff:.1e}  dead {int((~alive).sum())} (same: {same_dead})"
        )


def part2(args) -> None:
    data = Synthetic(args.k, args.d, args.clusters, args.nnz, args.seed + 1)
    check = torch.arange(args.check) * (args.k // max(args.check, 1))
    print(
        f"part 2: N = {args.n} images, K = {args.k} concepts, D = {args.d}; "
        f"{args.nnz} non-zero per image, batches of {args.batch}"
    )
    before = rss_mb()
    acc = MSAccumulator(args.k, args.d)
    gen_time = add_time = 0.0
    kept_cols, kept_emb = [], []
    for start in range(0, args.n, args.batch):
        t0 = time.perf_counter()
        acts, emb = data.batch(min(args.batch, args.n - start))
        t1 = time.perf_counter()
        acc.add(acts, emb)
        t2 = time.perf_counter()
        gen_time += t1 - t0
        add_time += t2 - t1
        kept_cols.append(acts.index_select(1, check).to_dense())
        kept_emb.append(emb)
    t0 = time.perf_counter()
    scores = acc.scores()
    final = time.perf_counter() - t0
    state = sum(t.numel() * t.element_size() for t in (acc.ea, acc.s1, acc.s2, acc.lo, acc.hi))
    alive = scores[~torch.isnan(scores)]
    print(
        f"  closed form, streamed sparse: {add_time + final:.1f} s "
        f"(updates {add_time:.1f} s, final {final:.2f} s; generating data {gen_time:.1f} s)"
    )
    print(
        f"  peak RSS {rss_mb():.0f} MB (before {before:.0f} MB); accumulator state "
        f"{state / 2**20:.0f} MB; dense fp32 activations would be "
        f"{args.n * args.k * 4 / 1e9:.1f} GB"
    )
    print(
        f"  scores: {len(alive)} alive, {len(scores) - len(alive)} dead; mean {alive.mean():.4f}, "
        f"best {alive.max():.4f}"
    )
    dense_cols = torch.cat(kept_cols)
    embeddings = torch.cat(kept_emb)
    t0 = time.perf_counter()
    direct = monosemanticity_score(dense_cols, embeddings)
    chunk_time = time.perf_counter() - t0
    diff = (direct - scores[check]).abs().nan_to_num(0).max().item()
    print(
        f"  check: {args.check} concepts by the dense closed form: max |diff| {diff:.1e}; "
        f"that dense chunk took {chunk_time:.2f} s, i.e. about "
        f"{chunk_time * args.k / args.check:.0f} s for all K (extrapolated, not run)"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float64 accumulation")
    part1(args)
    part2(args)


if __name__ == "__main__":
    main()
