"""Benchmark of the Gluon Hopper forward beside plain SDPA (cuDNN on H100/H200) and sdpa:flash (FA2),
and our Triton forward, bf16, on the shapes the Gluon kernel is judged on:

- fa2: the FlashAttention-2 sweep, B*S = 16384 tokens, H = 2048 / D, S = 1k..16k, D = 128 and 64,
  causal and not;
- chunked: chunked prefill, B=4, H=32, Sq=512 against Sk=8192, D=128, bottom-right causal (plain
  SDPA and flash take torch's lower-right CausalBias).

    python -m flashdispatch.tools.bench_gluon --out DIR        # JSON in DIR/bench_gluon.json
    python -m flashdispatch.tools.bench_gluon --quick          # S = 1k, 4k, 16k only
    python -m flashdispatch.tools.bench_gluon --only-variants  # other kernel configs beside the default

Timing: tools.timing.interleaved_median_ms (CUDA events, warm-up, L2 flushed before every call,
providers interleaved in a shuffled order per repetition, median), on random normal inputs.
FLOPs: 4 * B * H * (visible query-key pairs) * D. Ratios are to plain SDPA measured in the same
run. Each shape's Gluon output is also compared with SDPA's (max abs difference), and a kernel that
does not finish within a watchdog's time ends the run with a message (a hang, not a slow kernel).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from flashdispatch.problem import Problem, problem_from_shape

PROVIDERS: tuple[str, ...] = ("gluon", "sdpa", "sdpa:flash", "triton")
# other configs of the Gluon kernel, timed as providers of their own where they apply (--variants)
VARIANTS: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {
    "gluon:s3": ((128,), {"STAGES": 3, "O_SEPARATE": False}),  # 3 K/V stages, O through Q's buffer
    "gluon:s2": ((64,), {"STAGES": 2}),
    "gluon:s4": ((64,), {"STAGES": 4}),
    "gluon:nopp": ((64, 128), {"PINGPONG": False}),  # the two warpgroups issue wgmmas without turns
    # the other keys of each variant are the shape's default: at D=64 on long rows three warpgroups
    "gluon:c2": ((64,), {"CONSUMERS": 2}),  # 128-row tiles, two consumer warpgroups
    "gluon:c3": ((64,), {"CONSUMERS": 3}),  # 192-row tiles, three consumer warpgroups taking turns
    "gluon:c3n64": ((64,), {"CONSUMERS": 3, "BLOCK_N": 64, "STAGES": 4}),  # the same, 64-key blocks
    "gluon:xtile": ((64, 128), {"XTILE": True}),  # a tile's last P V issued with the next tile's first S
    # the tile orders forced (the default, "gluon", takes the one gluon_forward.schedule picks)
    "gluon:head": ((64, 128, 256), {"ORDER": 0}),  # ORDER_HEAD: head by head
    "gluon:bottom": ((64, 128, 256), {"ORDER": 1}),  # ORDER_BOTTOM: bottom row block first across heads
    "gluon:pairs": ((64, 128, 256), {"ORDER": 2}),  # ORDER_PAIRS: zigzag pairs of row blocks
}
BASELINE = "sdpa"
HANG_SECONDS = 60.0


@dataclass(frozen=True)
class Case:
    """One benchmarked problem (flashdispatch.problem.Problem: bf16, forward, bhsd, Hq = Hkv)."""

    group: str  # fa2 | chunked
    problem: Problem

    def describe(self) -> str:
        p = self.problem
        s = f"S={p.seqlen_k}" if p.seqlen_q == p.seqlen_k else f"Sq={p.seqlen_q} Sk={p.seqlen_k}"
        return f"B={p.batch} H={p.heads_q} {s} D={p.head_dim}{' causal' if p.causal else ''}"

    def flops(self) -> float:
        return self.problem.flops()

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, **self.problem._asdict(), "dtype": self.problem.dtype_name}


def _case(group: str, batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool) -> Case:
    return Case(group, problem_from_shape((batch, heads, heads, seqlen_q, seqlen_k, head_dim), dtype=torch.bfloat16,
                                          causal=causal))


@dataclass
class Row:
    case: Case
    ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    max_abs_diff: float | None = None  # gluon vs plain SDPA

    def tflops(self, provider: str) -> float:
        ms = self.ms.get(provider)
        return self.case.flops() / (ms * 1e-3) / 1e12 if ms else float("nan")

    def ratio(self, provider: str) -> float:
        a, b = self.ms.get(provider), self.ms.get(BASELINE)
        return b / a if a and b else float("nan")


def cases(quick: bool = False) -> list[Case]:
    seqs = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384)
    out = [_case("fa2", 16384 // s, 2048 // d, s, s, d, causal)
           for d in (128, 64) for causal in (False, True) for s in seqs]
    out.append(_case("chunked", 4, 32, 512, 8192, 128, True))
    return out


def _providers(c: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashdispatch.tools.bench import plain_sdpa

    from flashdispatch.backends.triton.forward import attention_forward
    from flashdispatch.backends.triton.gluon_forward import gluon_attention_forward

    p = c.problem
    causal, scale = p.causal, p.head_dim ** -0.5

    def flash() -> Any:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return plain_sdpa(q, k, v, causal)

    variants = {name: (lambda cfg=cfg: gluon_attention_forward(q, k, v, causal=causal, scale=scale, config=cfg)[0])
                for name, (dims, cfg) in VARIANTS.items() if p.head_dim in dims}
    return {
        **variants,
        "gluon": lambda: gluon_attention_forward(q, k, v, causal=causal, scale=scale)[0],
        "sdpa": lambda: plain_sdpa(q, k, v, causal),
        "sdpa:flash": flash,
        "triton": lambda: attention_forward(q, k, v, causal=causal, scale=scale, config={})[0],
    }


class _Watchdog:
    """Ends the process when a first call (compile + run + sync) takes longer than HANG_SECONDS:
    a deadlocked kernel cannot be interrupted, and the rest of the run would wait forever."""

    def __init__(self, what: str, on_hang: Callable[[], None]) -> None:
        self._timer = threading.Timer(HANG_SECONDS, self._fire)
        self._what, self._on_hang = what, on_hang

    def _fire(self) -> None:
        sys.stdout.write(f"\nHANG: {self._what} did not finish within {HANG_SECONDS:.0f} s; stopping\n")
        sys.stdout.flush()
        self._on_hang()
        os._exit(3)

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._timer.cancel()


def measure(c: Case, providers: Sequence[str], warmup_ms: float, rep_ms: float, on_hang: Callable[[], None]) -> Row:
    from flashdispatch.tools.timing import interleaved_median_ms

    dev = torch.device("cuda")
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    p = c.problem
    q = torch.randn(p.batch, p.heads_q, p.seqlen_q, p.head_dim, device=dev, dtype=p.dtype, generator=g)
    k = torch.randn(p.batch, p.heads_kv, p.seqlen_k, p.head_dim, device=dev, dtype=p.dtype, generator=g)
    v = torch.randn(p.batch, p.heads_kv, p.seqlen_k, p.head_dim_v, device=dev, dtype=p.dtype, generator=g)
    fns = {n: f for n, f in _providers(c, q, k, v).items() if n in providers}
    row = Row(c)
    outs: dict[str, torch.Tensor] = {}
    for name in list(fns):  # first calls: compile, check, catch a hang before timing
        try:
            with _Watchdog(f"{name} at {c.describe()}", on_hang):
                outs[name] = fns[name]()
                torch.cuda.synchronize()
        except Exception as e:
            row.errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
            del fns[name]
    if "gluon" in outs and BASELINE in outs:
        row.max_abs_diff = float((outs["gluon"].float() - outs[BASELINE].float()).abs().max())
    del outs

    def failed(name: str, e: Exception) -> None:
        row.errors[name] = f"{type(e).__name__}: {e}"[:300]

    row.ms = interleaved_median_ms({n: (f, None) for n, f in fns.items()}, dev, warmup_ms=warmup_ms,
                                   rep_ms=rep_ms, failed=failed)
    return row


def _geomean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x == x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(rows: Sequence[Row], providers: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, sel in (("fa2 D=128", lambda r: r.case.group == "fa2" and r.case.problem.head_dim == 128),
                       ("fa2 D=64", lambda r: r.case.group == "fa2" and r.case.problem.head_dim == 64),
                       ("chunked", lambda r: r.case.group == "chunked")):
        rs = [r for r in rows if sel(r)]
        out[label] = {p: {"geomean": _geomean([r.ratio(p) for r in rs]),
                          "min": min((r.ratio(p) for r in rs if r.ratio(p) == r.ratio(p)), default=float("nan"))}
                      for p in providers if p != BASELINE}
    return out


def table(rows: Sequence[Row], providers: Sequence[str], card: str) -> str:
    lines = [f"Gluon forward, bf16, on {card}: TFLOP/s (x plain SDPA)"]
    head = f"{'shape':38s}" + "".join(f"{p:>15s}" for p in providers) + f"{'|gluon-sdpa|':>13s}"
    lines.append(head)
    for r in rows:
        cells = []
        for p in providers:
            if p in r.ms:
                t = r.tflops(p)
                cells.append(f"{t:5.0f}" + (f" ({r.ratio(p):4.2f}x)" if p != BASELINE else ""))
            else:
                cells.append("error" if p in r.errors else "-")
        diff = f"{r.max_abs_diff:13.2e}" if r.max_abs_diff is not None else f"{'-':>13s}"
        lines.append(f"{r.case.describe():38s}" + "".join(f"{c:>15s}" for c in cells) + diff)
    for label, per in summary(rows, providers).items():
        lines.append(f"{label}: " + ", ".join(f"{p} geomean {v['geomean']:.3f}x min {v['min']:.3f}x"
                                              for p, v in per.items() if v["geomean"] == v["geomean"]))
    errs = [f"  {r.case.describe()} {p}: {e}" for r in rows for p, e in r.errors.items()]
    if errs:
        lines.append("errors:")
        lines.extend(errs)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashdispatch.tools.bench_gluon", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for bench_gluon.json")
    ap.add_argument("--quick", action="store_true", help="S = 1k, 4k, 16k only")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    ap.add_argument("--variants", action="store_true", help=f"also time the kernel configs {sorted(VARIANTS)}")
    ap.add_argument("--only-variants", action="store_true",
                    help="time the variants beside gluon and plain SDPA only (JSON: bench_gluon_variants.json)")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.stdout.write("bench_gluon: needs a CUDA GPU\n")
        return 2
    providers = [p for p in args.providers.split(",") if p]
    if args.only_variants:
        providers = ["gluon", BASELINE]
    if args.variants or args.only_variants:
        providers += [v for v in VARIANTS if v not in providers]
    if BASELINE not in providers:
        providers.insert(1, BASELINE)
    card = torch.cuda.get_device_name()
    meta = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "providers": providers}
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        pass
    rows: list[Row] = []

    def dump() -> None:
        if not args.out:
            return
        os.makedirs(args.out, exist_ok=True)
        data = {"meta": meta, "summary": summary(rows, providers),
                "rows": [{**r.case.as_dict(), "describe": r.case.describe(), "ms": r.ms,
                          "tflops": {p: r.tflops(p) for p in r.ms}, "ratio_to_sdpa": {p: r.ratio(p) for p in r.ms},
                          "errors": r.errors, "max_abs_diff_gluon_sdpa": r.max_abs_diff} for r in rows]}
        name = "bench_gluon_variants.json" if args.only_variants else "bench_gluon.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(data, f, indent=1, default=str)

    t0 = time.perf_counter()
    for c in cases(args.quick):
        r = measure(c, providers, args.warmup_ms, args.rep_ms, dump)
        rows.append(r)
        line = "  ".join(f"{p} {r.tflops(p):5.0f}" + (f" ({r.ratio(p):.2f}x)" if p != BASELINE else "")
                         for p in providers if p in r.ms)
        sys.stdout.write(f"[{time.perf_counter() - t0:5.1f}s] {c.describe():34s} {line}"
                         f"{'  ERR ' + ','.join(r.errors) if r.errors else ''}\n")
        sys.stdout.flush()
        dump()
    sys.stdout.write("\n" + table(rows, providers, card) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
