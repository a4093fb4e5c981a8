"""A model of the Gluon forward's persistent schedule on the CPU: for each tile order, how busy the
SMs stay and how many key/value block reads miss an LRU L2, and what that costs on a given card.

    python -m flashdispatch.tools.gluon_schedule_model                      # the built-in shapes, H100
    python -m flashdispatch.tools.gluon_schedule_model --shape 16,16,16,1024,1024,128 --hbm-tbs 4.8

The tiles, their costs, their order and their dealing to the CTAs are the launcher's own
(gluon_forward: causal_row_block_costs, row_blocks, tile_heads, dealt_to, programs, schedule). Time
is counted in key blocks of one 128-row tile: each CTA runs its tiles' blocks back to back (plus one
block of fixed cost per tile), block j of a tile reading K/V block j of its kv head at that time;
the reads of all CTAs, in time order, go through an LRU cache of `--l2-mb`. Tensor time: the
busiest CTA's blocks at `--tflops` spread over the SMs; memory time: the missed blocks at
`--hbm-tbs`. A model, not a measurement: it ranks orders and shows when one is bound on memory; the
GPU decides (`bench_gluon --variants` times every order).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from flashdispatch.backends.triton import gluon_forward as gf

BLOCK = 128  # query rows per tile (two consumer warpgroups) and keys per block
SHAPES: tuple[tuple[int, int, int, int, int, int], ...] = (  # B, Hq, Hkv, Sq, Sk, D (causal)
    (16, 16, 16, 1024, 1024, 128), (4, 16, 16, 4096, 4096, 128), (1, 16, 16, 16384, 16384, 128),
    (4, 32, 32, 512, 8192, 128), (2, 8, 8, 3000, 3000, 128),
)
ORDER_NAMES = {gf.ORDER_HEAD: "head", gf.ORDER_BOTTOM: "bottom", gf.ORDER_PAIRS: "pairs"}


@dataclass(frozen=True)
class Modelled:
    order: int
    busy: float  # share of the SMs' time spent working
    miss: float  # share of K/V block reads that missed L2
    tensor_us: float
    memory_us: float


def model(b: int, hq: int, hkv: int, sq: int, sk: int, d: int, order: int, *, sms: int = 132,
          l2_mb: float = 40.0, tflops: float = 660.0, hbm_tbs: float = 3.35, elem_bytes: int = 2) -> Modelled:
    """One causal call in one tile order."""
    num_m, num_bh = -(-sq // BLOCK), b * hq
    heads = gf.tile_heads(order, num_bh, num_m)
    blocks = gf.causal_row_block_costs(num_m, sq, sk, BLOCK, BLOCK)[gf.row_blocks(order, num_bh, num_m)]
    nprog = gf.programs(order, blocks.size, sms)
    owner = gf.dealt_to(blocks.size, nprog, gf.order_unit(order))
    group = hq // hkv
    clock = np.zeros(nprog)
    reads: list[tuple[float, int, int]] = []
    for t in range(blocks.size):  # a CTA's tiles in the order it runs them
        p = owner[t]
        kv = (heads[t] // hq) * hkv + (heads[t] % hq) // group
        reads.extend((clock[p] + j, kv, j) for j in range(int(blocks[t])))
        clock[p] += blocks[t] + 1.0
    reads.sort()
    block_bytes = BLOCK * d * 2 * elem_bytes  # K and V
    capacity = int(l2_mb * 2**20 // block_bytes)
    cache: OrderedDict[tuple[int, int], None] = OrderedDict()
    misses = 0
    for _, kv, j in reads:
        key = (kv, j)
        if key in cache:
            cache.move_to_end(key)
            continue
        misses += 1
        cache[key] = None
        if len(cache) > capacity:
            cache.popitem(last=False)
    block_us = 4 * BLOCK * BLOCK * d / (tflops * 1e12 / sms) * 1e6
    busy = float((blocks.sum() + blocks.size) / (sms * clock.max()))
    return Modelled(order, busy, misses / max(len(reads), 1), float(clock.max()) * block_us,
                    misses * block_bytes / (hbm_tbs * 1e12) * 1e6)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashdispatch.tools.gluon_schedule_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=[], help="B,Hq,Hkv,Sq,Sk,D (causal); repeatable")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--l2-mb", type=float, default=40.0, help="L2 the model lets K/V use (H100/H200: 50 MB in all)")
    ap.add_argument("--tflops", type=float, default=660.0)
    ap.add_argument("--hbm-tbs", type=float, default=3.35, help="H100 3.35, H200 4.8")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] or list(SHAPES)
    out = sys.stdout
    out.write(f"{'shape (causal)':32s} {'order':7s} {'busy':>5s} {'miss':>5s} {'tensor us':>10s} {'memory us':>10s}"
              "  picked\n")
    for s in shapes:
        b, hq, hkv, sq, sk, d = s
        num_m = -(-sq // BLOCK)
        picked = gf.schedule(b * hq, num_m, sq, sk, BLOCK, BLOCK, True, False, args.sms, b * hkv * sk * d * 4,
                             50 * 2**20)[0]
        for order in (gf.ORDER_HEAD, gf.ORDER_BOTTOM, gf.ORDER_PAIRS):
            m = model(b, hq, hkv, sq, sk, d, order, sms=args.sms, l2_mb=args.l2_mb, tflops=args.tflops,
                      hbm_tbs=args.hbm_tbs)
            label = f"B{b} H{hq}/{hkv} {sq}x{sk} D{d}"
            out.write(f"{label:32s} {ORDER_NAMES[order]:7s} {m.busy:5.2f} {m.miss:5.2f} {m.tensor_us:10.0f} "
                      f"{m.memory_us:10.0f}  {'*' if order == picked else ''}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
