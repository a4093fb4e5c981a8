"""Decode timed as serving runs it, and how the timing method moves decode results.

Serving engines run each decode step (and each speculative verification step) as a CUDA-graph
replay: the host cost of a call is paid once, at capture. So the number that matters for these
calls is the GPU time of a replay, with the host time of an eager call beside it (what a loop
without graphs pays). `graph_replay` and `captured_in_serving` are what `flashdispatch bench`
and the serving and variants benches use for that.

The script below compares four ways of timing one decode problem across several providers:

Decode reads its KV cache once, so its time depends on where that cache is when the kernel starts:

- do_bench: triton.testing.do_bench, which zeroes a 256 MB buffer before each repetition. The kernel
  then starts with L2 full of dirty lines that must be written back as it reads (the anchors and
  `flashdispatch tune` use this method; the bench flushes the same way, then sleeps on the GPU).
- read-flush: the same, but the 256 MB buffer is read (summed) instead of written: L2 is cold for
  our data and holds only clean lines.
- rotated: `copies` distinct (q, k, v) sets, more bytes than L2, called in turn with no flush: each
  call finds its cache in HBM, as a decode step of a model with many layers does.
- warm: the same inputs back to back (as much of the cache as fits stays in L2).

    python -m flashdispatch.tools.decode_timing --out decode_timing.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from flashdispatch.problem import DECODE_MAX_SEQLEN_Q
from flashdispatch.tools.shapes import Shape
from flashdispatch.tools.timing import FLUSH_BYTES

# (name, B, Hq, Hkv, Sk, D)
SHAPES = [("decode-b1", 1, 32, 8, 8192, 128), ("decode-b8", 8, 32, 8, 8192, 128),
          ("decode-b64", 64, 32, 8, 2048, 128)]
TRITON_CONFIGS: dict[str, dict[str, Any] | None] = {
    "triton:default": None,
    "triton:s64-n32-w2": {"NUM_SPLITS": 64, "BLOCK_N": 32, "num_warps": 2, "num_stages": 2},
    "triton:s128-n32-w2": {"NUM_SPLITS": 128, "BLOCK_N": 32, "num_warps": 2, "num_stages": 2},
    "triton:s128-n64-w4": {"NUM_SPLITS": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "triton:s256-n32-w2": {"NUM_SPLITS": 256, "BLOCK_N": 32, "num_warps": 2, "num_stages": 2},
}


# Eager calls before the capture: they compile, pick a plan and run the launchers' first-call checks
# (which synchronise the host, and a capture forbids that).
GRAPH_WARMUP_CALLS = 3


def captured_in_serving(s: Shape) -> bool:
    """Whether serving runs this call inside a CUDA graph: a forward step of at most
    DECODE_MAX_SEQLEN_Q new tokens per sequence against a longer cache (decode, speculative
    verification). Prefill and training run eagerly (their shapes change every call)."""
    return s.pass_ != "fwd_bwd" and s.seqlen_q <= DECODE_MAX_SEQLEN_Q and s.seqlen_k > s.seqlen_q


def graph_replay(fn: Callable[[], Any], warmup_calls: int = GRAPH_WARMUP_CALLS) -> Callable[[], None]:
    """fn captured in a CUDA graph; returns the replay (which keeps the graph alive).

    The warm-up calls and the capture run on a side stream, as torch's documentation asks; a call
    that cannot be captured (a host sync, an allocation the graph cannot own) raises here.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    prev = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(g, stream=stream):
            fn()
    finally:
        # a failed capture raises from torch.cuda.graph's __exit__ before it leaves its stream
        # context: without this, every later call of the process would run on the side stream
        torch.cuda.set_stream(prev)
    torch.cuda.synchronize()
    return g.replay


def _events(n: int) -> list[torch.cuda.Event]:
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def time_flushed(fn: Callable[[], Any], reps: int, flush: Callable[[], Any]) -> float:
    starts, ends = _events(reps), _events(reps)
    for i in range(reps):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def time_rotated(fns: list[Callable[[], Any]], reps: int) -> float:
    n = reps * len(fns)
    starts, ends = _events(n), _events(n)
    for i in range(n):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def providers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], Any]]:
    from flashdispatch.backends.triton.decode import decode_forward

    scale = q.shape[-1] ** -0.5
    out: dict[str, Callable[[], Any]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    for name, cfg in TRITON_CONFIGS.items():
        out[name] = (lambda c: lambda: decode_forward(q, k, v, causal=False, scale=scale, config=c or {}))(cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=dev).fill_(1)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for name, b, hq, hkv, sk, d in SHAPES:
        kv_bytes = 2 * b * hkv * sk * d * 2
        copies = max(2, -(-4 * l2 // kv_bytes))  # four L2s of distinct caches between two uses of one
        sets = [(torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16),
                 torch.randn(b, hkv, sk, d, device=dev, dtype=torch.bfloat16),
                 torch.randn(b, hkv, sk, d, device=dev, dtype=torch.bfloat16)) for _ in range(copies)]
        per_set = [providers(*s) for s in sets]
        ref = per_set[0]["sdpa"]().float()
        for prov in per_set[0]:
            out = per_set[0][prov]()
            out = out[0] if isinstance(out, tuple) else out
            err = float((out.float() - ref).abs().max())
            fn = per_set[0][prov]
            for _ in range(20):
                fn()
            row = {"shape": name, "provider": prov, "max_err": err, "copies": copies,
                   "do_bench_us": float(do_bench(fn, warmup=10, rep=50, return_mode="median")) * 1e3,
                   "read_flush_us": time_flushed(fn, args.reps, lambda: buf.sum()),
                   "rotated_us": time_rotated([p[prov] for p in per_set], max(20, args.reps // copies)),
                   "warm_us": time_flushed(fn, args.reps, lambda: None)}
            row["rotated_GBps"] = kv_bytes / row["rotated_us"] / 1e3
            result["rows"].append(row)
            print(f"{name:11s} {prov:20s} err {err:.1e}  do_bench {row['do_bench_us']:7.1f}  read-flush "
                  f"{row['read_flush_us']:7.1f}  rotated {row['rotated_us']:7.1f} ({row['rotated_GBps']:5.0f} GB/s)"
                  f"  warm {row['warm_us']:7.1f}", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
        del sets, per_set
    print("\nratio sdpa / provider (>1: faster than plain SDPA)")
    methods = ("do_bench_us", "read_flush_us", "rotated_us", "warm_us")
    print(f"{'shape':11s} {'provider':20s} " + " ".join(f"{m[:-3]:>10s}" for m in methods))
    for r in result["rows"]:
        base = next(x for x in result["rows"] if x["shape"] == r["shape"] and x["provider"] == "sdpa")
        print(f"{r['shape']:11s} {r['provider']:20s} " + " ".join(f"{base[m] / r[m]:10.2f}" for m in methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
