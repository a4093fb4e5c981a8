"""Benchmark of the cupy backend against torch SDPA (flash, cuDNN) on the FlashAttention-2 sweep.

Shapes: B*S = 16384, H = 2048 / D, S in 512..16384, D in {64, 128}, causal and not (the FA2
paper's sweep). FLOPs: 4*B*H*S*S*D, halved when causal; backward
2.5x forward. Times are triton.testing.do_bench medians on random data, every provider of a shape
in the same process. Not a test: it asserts nothing.

    python -m flashdispatch.tools.bench_cupy [--dtype bf16] [--tune] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashdispatch.backends.cupy import configs, cupy_backward, cupy_forward
from flashdispatch.backends.sdpa import bottom_right_sdpa

SEQLENS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS: tuple[int, ...] = (64, 128)
TOKENS = 16384
HIDDEN = 2048


def flops(b: int, h: int, s: int, d: int, causal: bool, backward: bool = False) -> float:
    f = 4.0 * b * h * s * s * d / (2.0 if causal else 1.0)
    return f * 2.5 if backward else f


def _bench(fn: Callable[[], Any], rep: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median"))


def _sdpa(kernel: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    with sdpa_kernel(kernel):
        return bottom_right_sdpa(q, k, v, causal=causal)


def run_shape(
    s: int, d: int, causal: bool, dtype: torch.dtype, cfg: dict[str, int] | None, rep: int, backward: bool
) -> dict[str, Any]:
    b, h = TOKENS // s, HIDDEN // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
    do = torch.randn_like(q)
    row: dict[str, Any] = {"S": s, "D": d, "causal": causal, "B": b, "H": h}
    f_fwd, f_bwd = flops(b, h, s, d, causal), flops(b, h, s, d, causal, True)
    out, lse = cupy_forward(q, k, v, causal=causal, scale=None, config=cfg)
    row["cupy_fwd_ms"] = _bench(lambda: cupy_forward(q, k, v, causal=causal, scale=None, config=cfg), rep)
    if backward:
        row["cupy_bwd_ms"] = _bench(
            lambda: cupy_backward(do, q, k, v, out, lse, causal=causal, scale=None, config=cfg), rep
        )
    for name, kern in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            row[f"{name}_fwd_ms"] = _bench(lambda: _sdpa(kern, q, k, v, causal), rep)
            if backward:
                qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                o = _sdpa(kern, qg, kg, vg, causal)
                row[f"{name}_bwd_ms"] = _bench(
                    lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), rep
                )
        except RuntimeError as e:  # a kernel that declines the shape
            row[f"{name}_error"] = str(e).splitlines()[0]
    for key in list(row):
        if key.endswith("_ms"):
            f = f_bwd if "_bwd_" in key else f_fwd
            row[key.replace("_ms", "_tflops")] = f / (row[key] * 1e-3) / 1e12
    return row


def _tag(cfg: dict[str, int], keys: tuple[str, ...]) -> str:
    return "{}x{}w{}".format(*(cfg[k] for k in keys))


def tune_shape(
    s: int, d: int, causal: bool, dtype: torch.dtype, rep: int, backward: bool
) -> tuple[dict[str, int], dict[str, float]]:
    """Fastest config of the space for one shape: forward configs timed on the forward, backward
    configs on the backward; every candidate's time is returned too."""
    b, h = TOKENS // s, HIDDEN // d
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
    cc = torch.cuda.get_device_capability()
    ccn = cc[0] * 10 + cc[1]
    base = configs.default_config(d, ccn)
    times: dict[str, float] = {}
    best = dict(base)
    fwd_space = [c for c in configs.config_space(d, ccn, backward=False)]
    fwd_t = {}
    for cfg in fwd_space:
        fwd_t[_tag(cfg, configs.FWD_KEYS)] = _bench(lambda: cupy_forward(q, k, v, causal=causal, scale=None, config=cfg), rep)
    top = min(fwd_space, key=lambda c: fwd_t[_tag(c, configs.FWD_KEYS)])
    best.update({k_: top[k_] for k_ in configs.FWD_KEYS})
    times.update({f"fwd:{k_}": t for k_, t in fwd_t.items()})
    if backward and d in configs.BACKWARD_HEAD_DIMS:
        out, lse = cupy_forward(q, k, v, causal=causal, scale=None, config=best)
        do = torch.randn_like(q)

        def time_bwd(cfg: dict[str, int]) -> float:
            return _bench(lambda: cupy_backward(do, q, k, v, out, lse, causal=causal, scale=None, config=cfg), rep)

        # first the dK/dV shape (BWD_*), then the dQ shape (DQ_*) on top of the winner
        no_dq = {k_: v_ for k_, v_ in best.items() if k_ not in configs.DQ_KEYS}
        bwd_t = {}
        for c in configs.bwd_candidates(d, ccn):
            bwd_t[c] = time_bwd({**no_dq, **dict(zip(configs.BWD_KEYS, c))})
            times["bwd:{}x{}w{}".format(*c)] = bwd_t[c]
        top = min(bwd_t, key=bwd_t.__getitem__)
        best = {**no_dq, **dict(zip(configs.BWD_KEYS, top))}
        top_t = bwd_t[top]
        for c in configs.dq_candidates(d, ccn):
            cand = {**best, **dict(zip(configs.DQ_KEYS, c))}
            t = times["dq:{}x{}w{}".format(*c)] = time_bwd(cand)
            if t < top_t:
                top_t, best_dq = t, cand
        if top_t < bwd_t[top]:
            best = best_dq
    return best, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cupy-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="bf16")
    ap.add_argument("--tune", action="store_true", help="time every forward config, keep the best")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    rows = []
    t0 = time.perf_counter()
    for d in args.head_dims:
        for causal in (False, True):
            for s in args.seqlens:
                cfg = None
                tuned: dict[str, float] = {}
                if args.tune:
                    cfg, tuned = tune_shape(s, d, causal, dtype, max(20, args.rep // 4), not args.no_backward)
                row = run_shape(s, d, causal, dtype, cfg, args.rep, not args.no_backward)
                row["config"] = cfg or configs.default_config(d)
                row["tuned_ms"] = tuned
                rows.append(row)
                torch.cuda.empty_cache()
    result = {
        "card": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    w = sys.stdout.write
    w(f"{result['card']} {args.dtype}  TFLOP/s fwd (bwd); ratio = cupy / sdpa:flash\n")
    w("  D causal     S |  cupy fwd  flash  cudnn ratio |  cupy bwd  flash  cudnn ratio | config\n")
    for r in rows:
        def g(key: str) -> float:
            return float(r.get(key, float("nan")))

        c = r["config"]
        w(
            f"{r['D']:3d} {str(r['causal']):5s} {r['S']:5d} | {g('cupy_fwd_tflops'):8.0f} {g('flash_fwd_tflops'):6.0f} "
            f"{g('cudnn_fwd_tflops'):6.0f} {g('cupy_fwd_tflops') / g('flash_fwd_tflops'):5.2f} | "
            f"{g('cupy_bwd_tflops'):8.0f} {g('flash_bwd_tflops'):6.0f} {g('cudnn_bwd_tflops'):6.0f} "
            f"{g('cupy_bwd_tflops') / g('flash_bwd_tflops'):5.2f} | "
            f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')}w{c.get('WARPS')} "
            f"bwd {c.get('BWD_BLOCK_M')}x{c.get('BWD_BLOCK_N')}w{c.get('BWD_WARPS')} "
            f"dq {c.get('DQ_BLOCK_M', '-')}x{c.get('DQ_BLOCK_N', '-')}w{c.get('DQ_WARPS', '-')}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
