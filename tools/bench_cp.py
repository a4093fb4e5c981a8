"""Context parallelism on 2-8 GPUs: every strategy (ring, Ulysses, hybrid) against one GPU.

    torchrun --nproc_per_node 8 -m flashdispatch.tools.bench_cp --json cp.json

Defaults: S = 64k, 128k, 256k, causal, bf16, B=1, Hq 32 / Hkv 8, D=128 (a GQA model of 4096 width).
For each S: forward+backward and forward on one GPU over the whole sequence (the dispatcher's
choice; rank 0, skipped with a note where it does not fit in memory), then every split the heads
allow (U = every divisor of the world: ring U=1, Ulysses U=W, hybrid between), each with

    wall        fwd+bwd and fwd through flashdispatch.distributed.attention(strategy=..., ulysses_size=U)
    compute     the same local kernels with the transfers removed: the ring's blocks over a loopback
                "ring" (ring, hybrid), the local call on the head-split shapes (Ulysses)
    comm        the transfers alone: the all-to-alls of one fwd+bwd (q, k, v in; out back; dO in;
                dq, dk, dv back) and the ring's hops (R-1 K/V hops forward; R-1 K/V and R dK/dV
                backward), each timed alone
    overlap     compute / wall (1: the transfers cost nothing), and hidden = (compute + comm - wall)
                / comm (the share of the transfers that ran under the compute)
    predicted   the cost model's time for the same split (strategy.DEFAULT_COSTS for the device)

and which split `strategy="auto"` picks. Prints a table on rank 0; --json writes every number.
Medians over a FIXED number of repetitions with CUDA events (bench_ring's timer: ranks that
disagree on a repetition count deadlock), the slowest rank's median reported. On CPU (gloo) it
smoke-tests itself with tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist

import flashdispatch
import flashdispatch.distributed as fdd
from flashdispatch.distributed import strategy as st
from flashdispatch.distributed import ulysses
from flashdispatch.distributed.block_backward import accumulation_dtype
from flashdispatch.distributed.comm import LoopbackComm, RingComm
from flashdispatch.distributed.ring import RingAttention
from flashdispatch.problem import DTYPES_BY_NAME
from flashdispatch.tools.bench_ring import (
    fwd_bwd_step, fwd_step, median_ms, problem_args, run_meta, slowest_rank_ms, start_process_group,
)

log = logging.getLogger("flashdispatch.tools.bench_cp")

# The problem: long-context GQA training (Llama-3-8B's heads: 32 query, 8 kv, D=128).
DEFAULT_SEQLENS = (65536, 131072, 262144)


def _single(args: argparse.Namespace, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
            causal: bool, device: torch.device) -> dict[str, Any]:
    """One GPU, the whole sequence, through the dispatcher (rank 0 only)."""
    res: dict[str, Any] = {}
    try:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        d = flashdispatch.explain(*(t.detach() for t in full), causal=causal, needs_grad=True)
        res["single_variant"] = d.variant

        def f(a, b, c):  # type: ignore[no-untyped-def]
            return flashdispatch.attention(a, b, c, causal=causal)

        res["single_ms"] = median_ms(fwd_bwd_step(f, *full, do), args.warmup, args.reps, device)
        res["single_fwd_ms"] = median_ms(fwd_step(f, *full), args.warmup, args.reps, device)
    except torch.cuda.OutOfMemoryError as e:  # "where it fits": the note says why not
        res["single_note"] = f"does not fit on one GPU: {str(e).splitlines()[0]}"
        log.warning("S=%d: %s", q.shape[2], res["single_note"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _compute_only(split: ulysses.Split, local: list[torch.Tensor], causal: bool, scale: float
                  ) -> tuple[Callable[..., torch.Tensor], list[torch.Tensor] | None]:
    """The strategy's local kernels with no transfer at all, and the tensors to run them on (None:
    the local slices themselves): the ring's blocks over a loopback ring (ring, hybrid; the hybrid's
    on tensors of the head-split shapes), or the local call on those shapes (Ulysses)."""
    u, r = split.u, split.r
    q, k, v = local
    if u == 1:
        spec = fdd.ring_spec(q, k, v, rank=split.rank, world=split.world, causal=causal, scale=scale, layout="bhsd")
        loop = LoopbackComm(split.rank, split.world)
        return (lambda a, b_, c: RingAttention.apply(a, b_, c, spec, loop)[0]), None
    b, hq, s, d = q.shape
    hkv = max(k.shape[1], u)
    qh, kh, vh = (torch.randn(b, h // u, u * s, dim, dtype=q.dtype, device=q.device)
                  for h, dim in ((hq, d), (hkv, d), (hkv, v.shape[3])))
    if r == 1:
        return (lambda a, b_, c: flashdispatch.attention(a, b_, c, causal=causal, scale=scale)), [qh, kh, vh]
    spec = fdd.ring_spec(qh, kh, vh, rank=split.ring_rank, world=r, causal=causal, scale=scale, layout="bhsd")
    loop = LoopbackComm(split.ring_rank, r)
    return (lambda a, b_, c: RingAttention.apply(a, b_, c, spec, loop)[0]), [qh, kh, vh]


def _comm_only(split: ulysses.Split, local: list[torch.Tensor], args: argparse.Namespace, device: torch.device
               ) -> dict[str, float]:
    """The transfers of one fwd+bwd, each kind timed alone (slowest rank's medians, ms). The
    backward's all-to-alls move the forward's bytes (dO as out, dq/dk/dv as q/k/v): counted twice."""
    u, r = split.u, split.r
    q, k, v = (t.detach() for t in local)
    b, hq, s, d = q.shape
    hkv = max(k.shape[1], u) if u > 1 else k.shape[1]
    out: dict[str, float] = {}

    def timed(fn: Callable[[], object]) -> float:
        return slowest_rank_ms(median_ms(fn, args.warmup, args.reps, device), device)

    if u > 1:
        kv = [t.repeat_interleave(hkv // t.shape[1], dim=1) for t in (k, v)]
        o = torch.randn(b, hq, s, v.shape[3], dtype=q.dtype, device=device)
        heads_o = ulysses.to_heads([o], split)
        sink = [torch.empty_like(o)]
        qkv = [q, *kv]
        out["a2a_qkv_ms"] = timed(lambda: ulysses.to_heads(qkv, split))
        out["a2a_out_ms"] = timed(lambda: ulysses.to_seq(heads_o, split, sink))
        out["a2a_ms"] = 2 * (out["a2a_qkv_ms"] + out["a2a_out_ms"])
    if r > 1:
        comm: RingComm = ulysses.GroupRing(split) if u > 1 else RingComm(split.group)
        # one hop of the ring (across groups) carries Hkv'/U heads of U*s tokens
        hop = [torch.randn(b, hkv // u, u * s, dim, dtype=q.dtype, device=device) for dim in (d, v.shape[3])]
        acc = [t.to(accumulation_dtype(t.dtype)) for t in hop]
        out["kv_hop_ms"] = timed(lambda: comm.exchange(hop).wait())
        out["dkv_hop_ms"] = timed(lambda: comm.exchange(acc).wait())
        out["kv_hop_bytes"] = sum(t.numel() * t.element_size() for t in hop)
        out["ring_comm_ms"] = 2 * (r - 1) * out["kv_hop_ms"] + r * out["dkv_hop_ms"]
    out["comm_ms"] = out.get("a2a_ms", 0.0) + out.get("ring_comm_ms", 0.0)
    return out


def bench_one(seqlen: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES_BY_NAME[args.dtype]
    causal = not args.no_causal
    hkv = args.kv_heads
    gen = torch.Generator(device=device).manual_seed(seqlen)

    def make(h: int) -> torch.Tensor:
        # fresh random data, identical on every rank (same seed): never time on zeros
        return torch.randn(args.batch, h, seqlen, args.dim, generator=gen, device=device, dtype=dtype)

    q, k, v, do = make(args.heads), make(hkv), make(hkv), make(args.heads)
    local = [fdd.shard(t, 2).requires_grad_() for t in (q, k, v)]
    ldo = fdd.shard(do, 2)
    scale = args.dim ** -0.5
    dims = st.dims_of(*local, layout="bhsd", world=world, causal=causal, needs_grad=True)
    res: dict[str, Any] = {"seqlen": seqlen, "world": world, "batch": args.batch, "heads": args.heads,
                           "kv_heads": hkv, "dim": args.dim, "dtype": args.dtype, "causal": causal,
                           "tflop_fwd_bwd": dims.flops() * 3.5 / 1e12}
    if rank == 0 and not args.skip_single:
        res.update(_single(args, q, k, v, do, causal, device))
    del q, k, v, do
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()

    cost = st.default_cost(device)
    topo = st.topology(dist.group.WORLD)
    auto = fdd.explain(*(t.detach() for t in local), causal=causal, needs_grad=True)
    res["auto"] = {"strategy": auto.strategy, "ulysses_size": auto.choice.ulysses_size, "plan": str(auto)}
    res["cost_model"] = cost.source
    res["ranks_per_node"] = topo.ranks_per_node
    res["splits"] = []
    for u in st.candidate_sizes(world):
        if st.ulysses_reason(dims, u) is not None or (args.only and st.strategy_name(u, world) not in args.only):
            continue
        name = st.strategy_name(u, world)
        split = ulysses.Split(dist.group.WORLD, world, rank, u, causal)
        row: dict[str, Any] = {"strategy": name, "ulysses_size": u, "ring_size": world // u,
                               "predicted_ms": st.predict(dims, u, cost, topo.ranks_per_node).total_s * 1e3}

        def run(a, b_, c, name=name, u=u):  # type: ignore[no-untyped-def]
            return fdd.attention(a, b_, c, causal=causal, strategy=name, ulysses_size=u if name == "hybrid" else None)

        row["ms"] = slowest_rank_ms(median_ms(fwd_bwd_step(run, *local, ldo), args.warmup, args.reps, device), device)
        row["fwd_ms"] = slowest_rank_ms(median_ms(fwd_step(run, *local), args.warmup, args.reps, device), device)
        fn, heads = _compute_only(split, [t.detach() for t in local], causal, scale)
        tensors = local if heads is None else [t.requires_grad_() for t in heads]
        cdo = ldo if heads is None else torch.randn_like(heads[0])
        row["compute_ms"] = slowest_rank_ms(median_ms(fwd_bwd_step(fn, *tensors, cdo), args.warmup, args.reps, device), device)
        row["compute_fwd_ms"] = slowest_rank_ms(median_ms(fwd_step(fn, *tensors), args.warmup, args.reps, device), device)
        del fn, heads, tensors, cdo
        row.update(_comm_only(split, local, args, device))
        row["overlap"] = row["compute_ms"] / row["ms"]
        comm = row["comm_ms"]
        row["hidden"] = max(0.0, min(1.0, (row["compute_ms"] + comm - row["ms"]) / comm)) if comm > 0 else 1.0
        res["splits"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| S | GPUs | strategy | 1 GPU ms (backend) | fwd+bwd ms | speedup | predicted ms | compute ms | "
        "comm ms | overlap (compute/wall) | comm hidden | fwd ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        single = r.get("single_ms")
        single_txt = f"{single:.1f} ({r['single_variant']})" if single else r.get("single_note", "-")
        for sp in r["splits"]:
            pick = " (auto)" if sp["ulysses_size"] == r["auto"]["ulysses_size"] else ""
            split = f"{sp['strategy']} U={sp['ulysses_size']}x R={sp['ring_size']}{pick}"
            speed = f"{single / sp['ms']:.2f}x" if single else "-"
            out.append(
                f"| {r['seqlen']} | {r['world']} | {split} | {single_txt} | {sp['ms']:.1f} | {speed} | "
                f"{sp['predicted_ms']:.1f} | {sp['compute_ms']:.1f} | {sp['comm_ms']:.1f} | {sp['overlap']:.2f} | "
                f"{sp['hidden']:.2f} | {sp['fwd_ms']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = problem_args(__doc__.splitlines()[0], seqlens=DEFAULT_SEQLENS, heads=32, kv_heads=8, warmup=1, reps=3)
    ap.add_argument("--only", nargs="+", choices=["ring", "ulysses", "hybrid"], default=None,
                    help="time only these strategies")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rank, device, gpu = start_process_group(timeout_minutes=10)
    rows = []
    for s in args.seqlens:
        r = bench_one(s, args, device)
        rows.append(r)
        if rank == 0:
            log.info("%s", json.dumps({k: v for k, v in r.items() if k != "auto"}))
    if rank == 0:
        meta = run_meta(device, gpu)
        log.info("%s\n%s", rows[-1]["auto"]["plan"], json.dumps(meta))
        log.info("%s", _table(rows))
        # the model's parameters from these measurements, and its predictions with them
        fitted = st.fit_cost(rows, st.default_cost(device))
        meta["fitted_cost"] = {k: v for k, v in vars(fitted).items()}
        for r in rows:
            dims = st.Dims(r["batch"], r["heads"], r["kv_heads"], r["seqlen"], r["dim"], r["dim"],
                           DTYPES_BY_NAME[r["dtype"]].itemsize, r["causal"], r["world"])
            for sp in r["splits"]:
                sp["predicted_fitted_ms"] = st.predict(dims, sp["ulysses_size"], fitted,
                                                       r["ranks_per_node"]).total_s * 1e3
        log.info("fitted cost model: %s", fitted)
        log.info("%s", "\n".join(f"S={r['seqlen']} {sp['strategy']} U={sp['ulysses_size']}: measured "
                                  f"{sp['ms']:.1f} ms, predicted {sp['predicted_ms']:.1f} (defaults), "
                                  f"{sp['predicted_fitted_ms']:.1f} (fitted)" for r in rows for sp in r["splits"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
