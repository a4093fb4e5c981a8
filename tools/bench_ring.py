"""Ring attention across GPUs against one GPU running the whole sequence.

    torchrun --nproc_per_node 2 -m flashdispatch.tools.bench_ring --seqlens 32768 65536 --json ring.json

For each sequence length: forward+backward time on one GPU (the dispatcher's choice, and the ring's
local backend forced, when they differ), the ring over every rank, the ring's compute alone (the same
blocks with no transfers) and the transfers alone, and from these the overlap: how much of the
traffic hides behind the compute. Prints a table on rank 0; --json writes every number.

Times are medians over a FIXED number of repetitions, with CUDA events, after warm-up. Not
triton.testing.do_bench: it derives its repetition count from each process's own estimate, and
ranks that disagree on the count deadlock inside the ring. The slowest rank's median is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

import flashdispatch
import flashdispatch.distributed as fdd
from flashdispatch.distributed.block_backward import accumulation_dtype
from flashdispatch.distributed.comm import LoopbackComm, RingComm, all_agree
from flashdispatch.distributed.ring import RingAttention
from flashdispatch.problem import DTYPES_BY_NAME, problem_from_shape

log = logging.getLogger("flashdispatch.tools.bench_ring")

# The benchmark: bf16, D=128, causal, one sequence of 16 heads (a 2048-wide model) at
# 32k and 64k tokens.
DEFAULT_SEQLENS = (32768, 65536)


def median_ms(fn: Callable[[], object], warmup: int, reps: int, device: torch.device) -> float:
    """Median of `reps` timed calls; every rank makes exactly the same number of calls. CUDA events
    on a GPU; a host clock on the CPU (where the tool only smoke-tests itself over gloo)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def slowest_rank_ms(ms: float, device: torch.device) -> float:
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def fwd_bwd_step(f: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             do: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        out = f(q, k, v)
        return torch.autograd.grad(out, (q, k, v), do)

    return run


def fwd_step(f: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return f(q, k, v)

    return run


def bench_one(seqlen: int, args: argparse.Namespace, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES_BY_NAME[args.dtype]
    hkv = args.kv_heads or args.heads
    causal = not args.no_causal
    gen = torch.Generator(device=device).manual_seed(seqlen)

    def make(h: int) -> torch.Tensor:
        # fresh random data, identical on every rank (same seed): never time on zeros
        return torch.randn(args.batch, h, seqlen, args.dim, generator=gen, device=device, dtype=dtype)

    q, k, v, do = make(args.heads), make(hkv), make(hkv), make(args.heads)
    local = [fdd.shard(t, 2).requires_grad_() for t in (q, k, v)]
    ldo = fdd.shard(do, 2)
    res: dict = {"seqlen": seqlen, "world": world, "batch": args.batch, "heads": args.heads, "kv_heads": hkv,
                 "dim": args.dim, "dtype": args.dtype, "causal": causal}
    p = problem_from_shape((args.batch, args.heads, hkv, seqlen, seqlen, args.dim), dtype=dtype, causal=causal,
                           needs_grad=True)
    res["tflop_fwd_bwd"] = (p.flops() + p.flops(backward=True)) / 1e12
    res["tflop_fwd"] = p.flops() / 1e12

    plan = fdd.explain_ring(*(t.detach() for t in local), causal=causal, backend=args.backend)
    ring_variant = plan.steps[0].decision.variant
    res["ring_plan"] = str(plan)
    res["ring_forward_variants"] = sorted({s.decision.variant for s in plan.steps})
    res["ring_backward_path"] = fdd.ring_spec(
        *local, rank=rank, world=world, causal=causal, scale=args.dim ** -0.5, layout="bhsd").backward_path

    # -- one GPU, whole sequence (rank 0; the others wait)
    if rank == 0 and not args.skip_single:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        d = flashdispatch.explain(*(t.detach() for t in full), causal=causal, needs_grad=True)
        res["single_variant"] = d.variant
        single = {d.variant: None}
        if ring_variant != d.variant:
            single[ring_variant] = ring_variant
        res["single_ms"], res["single_fwd_ms"] = {}, {}
        for name, forced in single.items():
            def f(a, b, c, forced=forced):  # type: ignore[no-untyped-def]
                return flashdispatch.attention(a, b, c, causal=causal, backend=forced)

            res["single_ms"][name] = median_ms(fwd_bwd_step(f, *full, do), args.warmup, args.reps, device)
            res["single_fwd_ms"][name] = median_ms(fwd_step(f, *full), args.warmup, args.reps, device)
        del full
    del q, k, v, do
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()

    # -- the ring
    def ring(a, b, c):  # type: ignore[no-untyped-def]
        return fdd.attention(a, b, c, causal=causal, backend=args.backend, strategy="ring")

    res["ring_ms"] = slowest_rank_ms(median_ms(fwd_bwd_step(ring, *local, ldo), args.warmup, args.reps, device), device)
    res["ring_fwd_ms"] = slowest_rank_ms(median_ms(fwd_step(ring, *local), args.warmup, args.reps, device), device)

    # -- the same blocks with no traffic: what the ring costs if transfers were free
    spec = fdd.ring_spec(*local, rank=rank, world=world, causal=causal, scale=args.dim ** -0.5, layout="bhsd",
                         backend=args.backend)
    loop = LoopbackComm(rank, world)

    def compute_only(a, b, c):  # type: ignore[no-untyped-def]
        return RingAttention.apply(a, b, c, spec, loop)[0]

    res["compute_ms"] = slowest_rank_ms(median_ms(fwd_bwd_step(compute_only, *local, ldo), args.warmup, args.reps, device), device)
    res["compute_fwd_ms"] = slowest_rank_ms(median_ms(fwd_step(compute_only, *local), args.warmup, args.reps, device), device)

    # -- the transfers alone: one K+V hop, one dK+dV (accumulation dtype) hop
    comm = RingComm(None)
    kv = [local[1].detach(), local[2].detach()]
    acc = accumulation_dtype(dtype)
    dkv = [t.to(acc) for t in kv]
    res["kv_hop_ms"] = slowest_rank_ms(median_ms(lambda: comm.exchange(kv).wait(), args.warmup, args.reps, device), device)
    res["dkv_hop_ms"] = slowest_rank_ms(median_ms(lambda: comm.exchange(dkv).wait(), args.warmup, args.reps, device), device)
    # -- for comparison, where the ring ran cuDNN blocks: the same ring with the triton backend's blocks.
    # Each rank decides its block kernels alone (its own self-check and device), and this branch runs
    # collectives (the ring, slowest_rank_ms): it is taken only where every rank ran cuDNN blocks, so that
    # no rank enters a ring the others skip. all_agree is itself a collective: every rank calls it.
    cudnn_everywhere = all_agree(spec.aten_cudnn)
    res["cudnn_blocks_on_every_rank"] = cudnn_everywhere
    if spec.aten_cudnn and not cudnn_everywhere:
        log.warning("rank %d: cuDNN ring blocks here but not on every rank: the triton-blocks comparison "
                    "is skipped", rank)
    if cudnn_everywhere and args.backend is None:
        tspec = fdd.ring_spec(*local, rank=rank, world=world, causal=causal, scale=args.dim ** -0.5,
                              layout="bhsd", backend="triton")

        def ring_triton(a, b, c):  # type: ignore[no-untyped-def]
            return fdd.attention(a, b, c, causal=causal, backend="triton", strategy="ring")

        def compute_triton(a, b, c):  # type: ignore[no-untyped-def]
            return RingAttention.apply(a, b, c, tspec, loop)[0]

        res["ring_triton_ms"] = slowest_rank_ms(
            median_ms(fwd_bwd_step(ring_triton, *local, ldo), args.warmup, args.reps, device), device)
        res["compute_triton_ms"] = slowest_rank_ms(
            median_ms(fwd_bwd_step(compute_triton, *local, ldo), args.warmup, args.reps, device), device)
    res["kv_hop_bytes"] = sum(t.numel() * t.element_size() for t in kv)
    res["dkv_hop_bytes"] = sum(t.numel() * t.element_size() for t in dkv)
    # forward: world-1 K/V hops; backward: world-1 K/V hops and world dK/dV hops
    res["comm_ms"] = (2 * (world - 1)) * res["kv_hop_ms"] + world * res["dkv_hop_ms"]
    return res


def _table(rows: list[dict]) -> str:
    out = [
        "| S | GPUs | 1 GPU fwd+bwd ms (backend) | ring fwd+bwd ms | speedup vs best 1 GPU | ring compute-only ms | "
        "traffic ms (K/V hop GB/s) | per step: compute / wall ms | ring TFLOP/s per GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        singles = r.get("single_ms", {})
        best = min(singles.values()) if singles else float("nan")  # the fastest single-GPU option
        single_txt = ", ".join(f"{v:.1f} ({n})" for n, v in singles.items()) or "-"
        gbs = r["kv_hop_bytes"] / (r["kv_hop_ms"] * 1e-3) / 1e9
        per_gpu = r["tflop_fwd_bwd"] / (r["ring_ms"] * 1e-3) / r["world"]
        out.append(
            f"| {r['seqlen']} | {r['world']} | {single_txt} | {r['ring_ms']:.1f} | {best / r['ring_ms']:.2f}x | "
            f"{r['compute_ms']:.1f} | {r['comm_ms']:.1f} ({gbs:.0f}) | "
            f"{r['compute_ms'] / r['world']:.2f} / {r['ring_ms'] / r['world']:.2f} ({r['compute_ms'] / r['ring_ms']:.2f}) | "
            f"{per_gpu:.0f} |"
        )
        if "ring_triton_ms" in r:
            c = r["ring_triton_ms"]
            out.append(
                f"| {r['seqlen']} | {r['world']} | (same ring, triton blocks) | {c:.1f} | {best / c:.2f}x | "
                f"{r['compute_triton_ms']:.1f} | | {r['compute_triton_ms'] / r['world']:.2f} / {c / r['world']:.2f} "
                f"({r['compute_triton_ms'] / c:.2f}) | "
                f"{r['tflop_fwd_bwd'] / (c * 1e-3) / r['world']:.0f} |"
            )
    return "\n".join(out)


def problem_args(description: str, *, seqlens: tuple[int, ...], heads: int, kv_heads: int | None, warmup: int,
                 reps: int) -> argparse.ArgumentParser:
    """The command line the context-parallel benchmarks share: the problem, the repetitions, the output."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seqlens", type=int, nargs="+", default=list(seqlens))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--kv-heads", type=int, default=kv_heads)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--json", default=None)
    return ap


def start_process_group(timeout_minutes: int) -> tuple[int, torch.device, bool]:
    """NCCL with one GPU per rank where there are GPUs, else gloo on the CPU: (rank, device, gpu)."""
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    return rank, device, gpu


def run_meta(device: torch.device, gpu: bool) -> dict[str, object]:
    """What a result file says about where it was measured."""
    return {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None,
            "world": dist.get_world_size(), "date": str(datetime.date.today())}


def main(argv: list[str] | None = None) -> None:
    ap = problem_args(__doc__.splitlines()[0], seqlens=DEFAULT_SEQLENS, heads=16, kv_heads=None, warmup=2, reps=5)
    ap.add_argument("--backend", default=None, help="force the ring's local backend (default: dispatcher)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rank, device, gpu = start_process_group(timeout_minutes=5)
    rows = []
    for s in args.seqlens:
        r = bench_one(s, args, device)
        rows.append(r)
        if rank == 0:
            log.info("%s", json.dumps({k: v for k, v in r.items() if k != "ring_plan"}))
    if rank == 0:
        meta = run_meta(device, gpu)
        log.info("%s\n%s", rows[0]["ring_plan"], json.dumps(meta))
        log.info("%s", _table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
