"""Side-by-side benchmark of the Triton backend against torch SDPA (plain, flash, cuDNN), with an
optional config sweep that prints the best config per shape.

    python -m flashdispatch.tools.bench_triton                     # default configs, all shapes
    python -m flashdispatch.tools.bench_triton --tune --out DIR    # sweep configs, best per shape
    python -m flashdispatch.tools.bench_triton --shapes decode --dtype bf16

Shapes (where they come from):
- fa2: the FlashAttention-2 paper's sweep: B*S = 16384, H = 2048 / D, S in 512..16384, D in
  {64, 128}, causal and not.
- chunked: chunked prefill, B=4, H=32, Sq=512 against Sk=8192, bottom-right causal (a KV cache).
- gqa: 32 query heads on 8 kv heads, B=4, S=4096, causal (Llama-style GQA).
- decode: Hq=32, Hkv=8, D=128, one new token: B=1 Sk=8192, B=8 Sk=8192, B=64 Sk=2048.
- d256: D=256, B*S=16384 (largest head dim the kernels take).

Timing: triton.testing.do_bench, median, on fresh random inputs (never zeros), warmed up.
FLOPs: Problem.flops() (4*B*H*Sq*Sk*D over the visible pairs). Configs are compiled in parallel
worker processes first (Triton's disk cache then serves the measuring process).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from flashdispatch.problem import Problem, problem_from_shape, problem_from_tensors
from flashdispatch.tools import shapes as shape_lists  # the one list of shapes

PROVIDERS_BASE: tuple[str, ...] = ("sdpa", "sdpa:flash", "sdpa:cudnn")
DTYPES: tuple[str, ...] = ("bf16", "fp16")  # names as problem.DTYPES_BY_NAME spells them


@dataclass(frozen=True)
class Case:
    """One benchmarked problem (flashdispatch.problem.Problem, forward, bhsd) under a short label."""

    label: str
    group: str  # fa2 | chunked | gqa | decode | d256
    problem: Problem

    def describe(self) -> str:
        p = self.problem
        s = f"S={p.seqlen_k}" if p.seqlen_q == p.seqlen_k else f"Sq={p.seqlen_q} Sk={p.seqlen_k}"
        h = f"H={p.heads_q}" if p.heads_q == p.heads_kv else f"H={p.heads_q}/{p.heads_kv}"
        return f"{p.dtype_name} B={p.batch} {h} {s} D={p.head_dim}{' causal' if p.causal else ''}"

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "group": self.group, **self.problem._asdict(), "dtype": self.problem.dtype_name}


def _case(s: shape_lists.Shape, label: str, group: str) -> Case:
    return Case(label, group, problem_from_shape(s.dims, dtype=s.dtype, causal=s.causal))


def fa2_cases(dtype: str, head_dims: Sequence[int] = shape_lists.FA2_HEAD_DIMS,
              seqlens: Sequence[int] = shape_lists.FA2_SEQLENS) -> list[Case]:
    """tools/shapes.py's FA2 sweep (forward), under this script's short labels."""
    return [_case(s, f"fa2-d{s.head_dim}{'-c' if s.causal else ''}-s{s.seqlen_k}", "fa2")
            for s in shape_lists.fa2_sweep((dtype,), head_dims, seqlens, passes=("fwd",))]


def special_cases(dtype: str) -> list[Case]:
    """tools/shapes.py's anchor shapes (chunked prefill, GQA, decode), under short labels."""
    out = []
    for s in shape_lists.special_shapes((dtype,)):
        if s.pass_ == "decode":
            mha = "-mha" if s.heads_q == s.heads_kv else ""
            out.append(_case(s, f"decode-b{s.batch}{mha}", "decode"))
        elif s.seqlen_q != s.seqlen_k:
            out.append(_case(s, "chunked-prefill", "chunked"))
        else:
            out.append(_case(s, f"gqa-{s.heads_q}-{s.heads_kv}", "gqa"))
    return out


def d256_cases(dtype: str) -> list[Case]:
    return [Case(f"d256{'-c' if c else ''}-s{s}", "d256", problem_from_shape((16384 // s, 8, 8, s, s, 256),
                                                                            dtype=dtype, causal=c))
            for c in (False, True) for s in (1024, 4096)]


def all_cases(groups: Sequence[str], dtype: str) -> list[Case]:
    cases: list[Case] = []
    if "fa2" in groups:
        cases += fa2_cases(dtype)
    cases += [c for c in special_cases(dtype) if c.group in groups]
    if "d256" in groups:
        cases += d256_cases(dtype)
    return cases


# --- running one provider ------------------------------------------------------------------------


def make_inputs(c: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    p = c.problem
    q = torch.randn(p.batch, p.heads_q, p.seqlen_q, p.head_dim, device="cuda", dtype=p.dtype, generator=g)
    k = torch.randn(p.batch, p.heads_kv, p.seqlen_k, p.head_dim, device="cuda", dtype=p.dtype, generator=g)
    v = torch.randn(p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v, device="cuda", dtype=p.dtype, generator=g)
    return q, k, v


def runner(name: str, c: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           config: dict[str, Any] | None) -> tuple[Callable[[], Any] | None, str]:
    """(fn, "") or (None, reason the provider cannot serve this case)."""
    from flashdispatch.registry import REGISTRY
    from flashdispatch.selection import device_for

    p = problem_from_tensors(q, k, v, causal=c.problem.causal, scale=None, layout="bhsd", return_lse=False)
    impl = REGISTRY.get(name)
    why = REGISTRY.availability(name)
    if why:
        return None, why
    dev = device_for(p)
    reasons = impl.not_supported_reasons(p, dev)
    if reasons:
        return None, "; ".join(reasons)
    cfg = dict(impl.default_config(p, dev)) if config is None else dict(config)
    return (lambda: impl.run(q, k, v, p, cfg)), ""


def bench_ms(fn: Callable[[], Any], quick: bool = False) -> float:
    from triton.testing import do_bench

    if quick:
        return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def flops(c: Case) -> float:
    return c.problem.flops()


def bytes_moved(c: Case) -> int:
    p = c.problem
    e = p.dtype.itemsize
    return e * (p.batch * p.heads_q * p.seqlen_q * (p.head_dim + p.head_dim_v)
                + p.batch * p.heads_kv * p.seqlen_k * (p.head_dim + p.head_dim_v))


# --- config candidates and parallel compilation ----------------------------------------------------


def candidates(c: Case, limit: int | None, small: bool = True) -> list[dict[str, Any]]:
    from flashdispatch.registry import REGISTRY
    from flashdispatch.selection import device_for

    p = c.problem
    impl = REGISTRY.get("triton")
    dev = device_for(p)
    space = impl.config_space(p, dev)
    default = impl.default_config(p, dev)
    if small:
        # the corner of the space that wins on H100-class GPUs; the full space is for the tuner
        bm = 64 if p.head_dim > 128 else 128
        space = [s for s in space if s.get("PATH", "split_kv") == "split_kv"
                 and (c.group == "decode" or (s["BLOCK_M"] == bm and s["BLOCK_N"] in (64, 128)))]
    out = [default] + [s for s in space if s != default]
    if c.group == "decode":
        extra = [{**default, "NUM_SPLITS": n} for n in (8, 16, 32, 64, 96)]
        out = out[:1] + extra + out[1:]
    return out[:limit] if limit else out


def _compile_job(args: tuple[Case, dict[str, Any]]) -> tuple[str, str]:
    c, cfg = args
    try:
        q, k, v = make_inputs(c)
        fn, why = runner("triton", c, q, k, v, cfg)
        if fn is None:
            return json.dumps(cfg, sort_keys=True), why
        fn()
        torch.cuda.synchronize()
        return json.dumps(cfg, sort_keys=True), ""
    except Exception as e:  # reported per config; the measuring process skips it
        return json.dumps(cfg, sort_keys=True), f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def precompile(jobs: list[tuple[Case, dict[str, Any]]], workers: int) -> dict[tuple[str, str], str]:
    """Compile in worker processes (each its own CUDA context): fills Triton's disk cache."""
    if not jobs:
        return {}
    t0 = time.time()
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        res = pool.map(_compile_job, jobs, chunksize=1)
    errors = {(j[0].label, r[0]): r[1] for j, r in zip(jobs, res) if r[1]}
    print(f"# precompiled {len(jobs)} (case, config) pairs in {time.time() - t0:.0f}s with {workers} "
          f"workers; {len(errors)} failed", flush=True)
    return errors


# --- the benchmark ----------------------------------------------------------------------------


@dataclass
class Row:
    case: Case
    ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    best_config: dict[str, Any] | None = None
    default_config: dict[str, Any] | None = None
    sweep: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    max_diff_vs_sdpa: float | None = None

    def rate(self, name: str) -> float | None:
        ms = self.ms.get(name)
        if ms is None:
            return None
        if self.case.group == "decode":
            return bytes_moved(self.case) / ms * 1e-6  # GB/s
        return flops(self.case) / ms * 1e-9  # TFLOP/s


def run_case(c: Case, tune: bool, limit: int | None, failed: dict[tuple[str, str], str],
             fixed: dict[str, Any] | None) -> Row:
    row = Row(c)
    q, k, v = make_inputs(c, seed=1)
    for name in PROVIDERS_BASE:
        fn, why = runner(name, c, q, k, v, None)
        if fn is None:
            row.skipped[name] = why
            continue
        try:
            row.ms[name] = bench_ms(fn)
        except Exception as e:
            row.skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    fn, why = runner("triton", c, q, k, v, fixed)
    if fn is None:
        row.skipped["triton"] = why
        return row
    cands = candidates(c, limit)
    row.default_config = fixed or cands[0]
    out = fn()[0]
    ref_fn, _ = runner("sdpa", c, q, k, v, None)
    if ref_fn is not None:
        ref = ref_fn()[0]
        row.max_diff_vs_sdpa = float((out.float() - ref.float()).abs().max())
    row.ms["triton"] = bench_ms(fn)
    if tune:
        sweep = []
        for cfg in cands:
            if (c.label, json.dumps(cfg, sort_keys=True)) in failed:
                continue
            f2, _ = runner("triton", c, q, k, v, cfg)
            try:
                sweep.append((bench_ms(f2, quick=True), cfg))
            except Exception as e:
                failed[(c.label, json.dumps(cfg, sort_keys=True))] = str(e)[:200]
        sweep.sort(key=lambda t: t[0])
        # the top few again with full repetitions: the quick pass only ranks
        final = []
        for _, cfg in sweep[:3]:
            f2, _ = runner("triton", c, q, k, v, cfg)
            final.append((bench_ms(f2), cfg))
        final.sort(key=lambda t: t[0])
        row.sweep = sweep
        if final:
            row.ms["triton:best"] = final[0][0]
            row.best_config = final[0][1]
    return row


def _fmt(x: float | None, w: int = 7) -> str:
    return f"{x:{w}.0f}" if x is not None else " " * (w - 1) + "-"


def summary(rows: list[Row], device_name: str) -> str:
    lines = [f"# {device_name}  (fwd: TFLOP/s; decode: GB/s; ratios are speed ratios, higher = triton faster)"]
    hdr = (f"{'case':40s} {'triton':>7s} {'best':>7s} {'sdpa':>7s} {'flash':>7s} {'cudnn':>7s} "
           f"{'x sdpa':>7s} {'x flash':>7s} {'x cudnn':>7s} {'us':>8s}  best config")
    lines.append(hdr)
    for r in rows:
        t = "triton:best" if "triton:best" in r.ms else "triton"
        tm = r.ms.get(t)

        def ratio(other: str) -> str:
            if tm is None or other not in r.ms:
                return "      -"
            return f"{r.ms[other] / tm:7.2f}"

        cfg = r.best_config if r.best_config is not None else r.default_config
        cfg_s = " ".join(f"{k}={v}" for k, v in sorted((cfg or {}).items()))
        lines.append(
            f"{r.case.describe():40s} {_fmt(r.rate('triton'))} {_fmt(r.rate('triton:best'))} {_fmt(r.rate('sdpa'))} "
            f"{_fmt(r.rate('sdpa:flash'))} {_fmt(r.rate('sdpa:cudnn'))} {ratio('sdpa')} {ratio('sdpa:flash')} "
            f"{ratio('sdpa:cudnn')} {tm * 1000 if tm else 0:8.1f}  {cfg_s}"
        )
    # the performance bars
    def best_ms(r: Row) -> float | None:
        return r.ms.get("triton:best", r.ms.get("triton"))

    fa2 = [r for r in rows if r.case.group == "fa2" and best_ms(r)]
    gates = []
    if fa2:
        vs_flash = [r.ms["sdpa:flash"] / best_ms(r) for r in fa2 if "sdpa:flash" in r.ms]
        d128 = [r.ms["sdpa:cudnn"] / best_ms(r) for r in fa2 if r.case.problem.head_dim == 128 and "sdpa:cudnn" in r.ms]
        if vs_flash:
            gates.append(f"fa2 min x flash = {min(vs_flash):.2f} (bar 1.0)")
        if d128:
            gates.append(f"fa2 D=128 geomean x cudnn = {math.exp(sum(map(math.log, d128)) / len(d128)):.2f} (bar 0.9)")
    bars = {"chunked-prefill": 1.5, "gqa-32-8": 1.0, "decode-b1": 1.8, "decode-b8": 1.0, "decode-b64": 1.0}
    for r in rows:
        if r.case.label in bars and best_ms(r) and "sdpa" in r.ms:
            gates.append(f"{r.case.label} x sdpa = {r.ms['sdpa'] / best_ms(r):.2f} (bar {bars[r.case.label]})")
    lines.append("# bars: " + "; ".join(gates))
    return "\n".join(lines)


def host_us_per_call(fn: Callable[[], Any], calls: int = 300) -> float:
    """Host time of back-to-back calls (the GPU queue absorbs the kernels)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def diagnose(labels: Sequence[str], dtype: str) -> list[str]:
    """Host cost per call vs GPU-only time (CUDA graph replay) for launch-bound shapes."""
    import triton
    import triton.language as tl
    from triton.testing import do_bench_cudagraph

    @triton.jit
    def _noop(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    x = torch.randn(1024, device="cuda")
    compiled = _noop[(1,)](x, 1024, BLOCK=1024)
    lines = [f"# diag: trivial triton launch host {host_us_per_call(lambda: _noop[(1,)](x, 1024, BLOCK=1024)):.1f} "
             f"us/call (JIT dispatch), {host_us_per_call(lambda: compiled[(1, 1, 1)](x, 1024, 1024)):.1f} us/call "
             f"(compiled kernel called directly), torch add {host_us_per_call(lambda: x.add_(0.0)):.1f} us/call"]
    cases = {c.label: c for c in all_cases(["fa2", "chunked", "gqa", "decode"], dtype)}
    for label in labels:
        c = cases[label]
        q, k, v = make_inputs(c, seed=3)
        variants: list[tuple[str, dict[str, Any] | None]] = [("triton", None), ("sdpa", None)]
        if c.group == "decode":
            variants.append(("triton", {"NUM_SPLITS": 1}))
        for name, cfg in variants:
            fn, why = runner(name, c, q, k, v, cfg)
            if cfg:
                name = f"{name}{cfg}"
            if fn is None:
                continue
            host = host_us_per_call(fn)
            try:
                graph = float(do_bench_cudagraph(fn, rep=50, return_mode="median")) * 1000
            except Exception as e:  # capture can fail for kernels that sync; say so
                graph = float("nan")
                lines.append(f"# diag: {label} {name}: graph capture failed: {type(e).__name__}: {e}"[:200])
            ev = bench_ms(fn) * 1000
            lines.append(f"# diag: {label:18s} {name:24s} host {host:7.1f} us/call  gpu(graph) {graph:8.1f} us  "
                         f"do_bench {ev:8.1f} us")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashdispatch.tools.bench_triton", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="fa2,chunked,gqa,decode",
                    help="comma list of groups: fa2, chunked, gqa, decode, d256")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--tune", action="store_true", help="sweep the config space, print the best per shape")
    ap.add_argument("--tune-at", default="",
                    help="comma list of case labels to sweep (default: every case when --tune)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many configs per case")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--config", default="", help="JSON config for every triton run (instead of defaults)")
    ap.add_argument("--filter", default="", help="only cases whose label contains this")
    ap.add_argument("--out", default="", help="directory for bench_triton.json")
    ap.add_argument("--diag", default="", help="comma list of case labels: host us/call vs GPU-only time")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write("bench_triton needs a CUDA/ROCm GPU\n")
        return 2
    cases = [c for c in all_cases(args.shapes.split(","), args.dtype) if args.filter in c.label]
    tune_at = set(filter(None, args.tune_at.split(","))) or {c.label for c in cases}
    fixed = json.loads(args.config) if args.config else None
    failed: dict[tuple[str, str], str] = {}
    if args.tune:
        jobs = [(c, cfg) for c in cases if c.label in tune_at for cfg in candidates(c, args.limit)]
        failed = precompile(jobs, args.workers)
    rows = []
    for c in cases:
        t0 = time.time()
        rows.append(run_case(c, args.tune and c.label in tune_at, args.limit, failed, fixed))
        r = rows[-1]
        print(f"# {c.label}: {', '.join(f'{k}={v * 1000:.1f}us' for k, v in r.ms.items())} "
              f"diff_vs_sdpa={r.max_diff_vs_sdpa} ({time.time() - t0:.0f}s) best={r.best_config}", flush=True)
    name = torch.cuda.get_device_name()
    table = summary(rows, name)
    if args.diag:
        table += "\n" + "\n".join(diagnose(args.diag.split(","), args.dtype))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_triton.json"), "w") as f:
            json.dump({"device": name, "torch": torch.__version__,
                       "rows": [{**asdict(r), "case": r.case.as_dict()} for r in rows],
                       "failed_configs": [list(k) + [v] for k, v in failed.items()]}, f, indent=1, default=str)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
