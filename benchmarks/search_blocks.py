#!/usr/bin/env python
"""Block shapes of the exact nearest-neighbour search, side by side: ``ops.search_blocks``
against the shape ``ops.nearest_neighbor`` used before it (commit bcbc253).

The old rule filled a block with as many gallery rows as the bound allowed first, so a gallery
of about ``block_elements`` rows or more left one or two query rows per block: matrix-vector
products that read the whole gallery again for every query or two. ``search_blocks`` makes
both sides as large as the bound allows. This script runs the same ``nearest_neighbor`` with
each rule (the old one put in place of ``search_blocks`` for its runs), the two interleaved
round by round so that the machine's load falls on both alike, checks that they find the same
neighbours, and prints the fastest and the median time of each and their ratios (on a busy
machine the fastest round is the steadier figure), for the leave-one-out's block bound
(``lake.fit.LOO_BLOCK_ELEMENTS``, 4 MiB of distances) and the default one (32 MiB).

    python benchmarks/search_blocks.py                  # 196 queries x 500,000 vectors x K=6, 5 rounds
    python benchmarks/search_blocks.py --queries 1024 --gallery 200000 --k 100 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch

from lakead import ops


def old_blocks(n_q: int, n_g: int, block_elements: int) -> tuple[int, int]:
    """The block shape before ``search_blocks`` (the two lines it replaced in ``nearest_neighbor``)."""
    q_block = max(1, min(n_q, block_elements // max(1, min(n_g, block_elements))))
    return q_block, max(1, min(n_g, block_elements // q_block))


def timed(queries: torch.Tensor, gallery: torch.Tensor, block_elements: int, old: bool) -> tuple[float, torch.Tensor]:
    with mock.patch.object(ops, "search_blocks", old_blocks) if old else contextlib.nullcontext():
        t0 = time.perf_counter()
        _, idx = ops.nearest_neighbor(queries, gallery, block_elements=block_elements)
        return time.perf_counter() - t0, idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=196, help="query rows (196: one image's 14x14 tokens)")
    ap.add_argument("--gallery", type=int, default=500_000, help="gallery rows")
    ap.add_argument("--k", type=int, default=6, help="channels (sensitive neurons)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block-elements", type=int, nargs="+", default=[1 << 20, ops.DEFAULT_BLOCK_ELEMENTS],
                    help="bounds on the distances held at once (default: the leave-one-out's and the default)")
    ap.add_argument("--bounds-only", action="store_true",
                    help="time today's rule at each --block-elements side by side (no old rule); ratios to the first")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(args.queries, args.k, generator=gen)  # (Q, K)
    gallery = torch.randn(args.gallery, args.k, generator=gen)  # (M, K)
    print(f"{args.queries} queries x {args.gallery:,} gallery vectors x K={args.k}, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} torch threads")
    if args.bounds_only:
        bounds(queries, gallery, args)
        return
    for be in args.block_elements:
        times: dict[bool, list[float]] = {True: [], False: []}
        timed(queries, gallery, be, False)  # warm-up
        for _ in range(args.rounds):
            for old in (True, False):
                t, idx = timed(queries, gallery, be, old)
                times[old].append(t)
                if old:
                    old_idx = idx
                elif not torch.equal(idx, old_idx):
                    raise SystemExit("the two block shapes found different neighbours")
        best_old, best_new = min(times[True]), min(times[False])
        med_old, med_new = statistics.median(times[True]), statistics.median(times[False])
        print(f"block_elements {be:,}: old blocks {old_blocks(args.queries, args.gallery, be)}, search_blocks "
              f"{ops.search_blocks(args.queries, args.gallery, be)}: fastest {best_old * 1e3:.0f} vs {best_new * 1e3:.0f} ms "
              f"(old/new x{best_old / best_new:.2f}), median {med_old * 1e3:.0f} vs {med_new * 1e3:.0f} ms "
              f"(x{med_old / med_new:.2f}); rounds old {', '.join(f'{t * 1e3:.0f}' for t in times[True])}, "
              f"new {', '.join(f'{t * 1e3:.0f}' for t in times[False])} ms")

def bounds(queries: torch.Tensor, gallery: torch.Tensor, args: argparse.Namespace) -> None:
    """Today's block rule at each bound, the bounds interleaved round by round (same neighbours checked)."""
    times: dict[int, list[float]] = {be: [] for be in args.block_elements}
    ref = None
    for be in args.block_elements:
        timed(queries, gallery, be, False)  # warm-up
    for _ in range(args.rounds):
        for be in args.block_elements:
            t, idx = timed(queries, gallery, be, False)
            times[be].append(t)
            if ref is None:
                ref = idx
            elif not torch.equal(idx, ref):
                raise SystemExit("two bounds found different neighbours")
    first = statistics.median(times[args.block_elements[0]])
    for be, ts in times.items():
        med = statistics.median(ts)
        print(f"block_elements {be:,}: blocks {ops.search_blocks(args.queries, args.gallery, be)}, median {med * 1e3:.1f} ms "
              f"(x{med / first:.2f} of the first), fastest {min(ts) * 1e3:.1f} ms; rounds {', '.join(f'{t * 1e3:.0f}' for t in ts)}")


if __name__ == "__main__":
    main()
