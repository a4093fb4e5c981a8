"""Sliding-window attention time of the cupy backend beside its own full causal call.

Shows that key blocks outside the window are skipped: the windowed call's time should follow the
number of visible (query, key) pairs, not S^2. One shape family (B=1, H=32, D=128, bf16, causal,
Mistral's window form window=(w - 1, 0)), forward and forward+backward, with torch SDPA's flash
kernel (full causal) as the anchor timed in the same run. Times are medians of interleaved
repetitions with the L2 flushed before each call (tools/timing.py), on random data.

    python -m flashdispatch.tools.bench_cupy_window [--seqlen 16384] [--windows 1024 4096 8192]
        [--no-backward] [--out cupy_window.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashdispatch.backends.cupy.ops import cupy_backward, cupy_forward
from flashdispatch.backends.sdpa import bottom_right_sdpa
from flashdispatch.tools.timing import interleaved_median_ms


def visible_pairs(s: int, window: int | None) -> int:
    """(query, key) pairs a causal call sees, with a window of `window` keys (None: no window)."""
    if window is None or window >= s:
        return s * (s + 1) // 2
    return window * s - window * (window - 1) // 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_cupy_window", description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--windows", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--rep-ms", type=float, default=200.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    s, h, d = args.seqlen, args.heads, args.head_dim
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(1, h, s, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    t0 = time.perf_counter()

    windows: list[int | None] = [None, *args.windows]
    fwd: dict[str, tuple[Callable[[], Any], None]] = {}
    bwd: dict[str, tuple[Callable[[], Any], None]] = {}
    for w in windows:
        name = "full causal" if w is None else f"window {w}"
        kw = {} if w is None else {"window_left": w - 1, "window_right": 0}
        out, lse = cupy_forward(q, k, v, causal=True, scale=None, **kw)  # compiles outside the timing
        fwd[name] = (lambda kw=kw: cupy_forward(q, k, v, causal=True, scale=None, **kw), None)
        if not args.no_backward:
            cupy_backward(do, q, k, v, out, lse, causal=True, scale=None, **kw)
            bwd[name] = (lambda kw=kw, out=out, lse=lse: (
                cupy_forward(q, k, v, causal=True, scale=None, **kw),
                cupy_backward(do, q, k, v, out, lse, causal=True, scale=None, **kw)), None)

    def sdpa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return bottom_right_sdpa(q, k, v, causal=True)

    fwd["sdpa:flash full causal"] = (sdpa, None)
    errors: dict[str, str] = {}
    fwd_ms = interleaved_median_ms(fwd, dev, rep_ms=args.rep_ms, failed=lambda n, e: errors.__setitem__(n, repr(e)))
    bwd_ms = interleaved_median_ms(bwd, dev, rep_ms=args.rep_ms) if bwd else {}

    rows = []
    full = visible_pairs(s, None)
    for w in windows:
        name = "full causal" if w is None else f"window {w}"
        pairs = visible_pairs(s, w)
        rows.append({
            "name": name, "window": w, "pairs_ratio": pairs / full,
            "fwd_ms": fwd_ms.get(name), "fwd_ratio": fwd_ms[name] / fwd_ms["full causal"],
            "fwd_tflops": 4.0 * pairs * d * h / (fwd_ms[name] * 1e-3) / 1e12,
            "fwd_bwd_ms": bwd_ms.get(name),
            "fwd_bwd_ratio": bwd_ms[name] / bwd_ms["full causal"] if bwd_ms else None,
        })
    result = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bf16",
        "B": 1, "H": h, "S": s, "D": d, "causal": True, "rows": rows,
        "sdpa_flash_full_causal_fwd_ms": fwd_ms.get("sdpa:flash full causal"), "errors": errors,
        "wall_s": time.perf_counter() - t0,
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    w_ = sys.stdout.write
    w_(f"{result['card']}  cupy, bf16, B=1 H={h} S={s} D={d}, causal; sdpa:flash full causal fwd "
       f"{result['sdpa_flash_full_causal_fwd_ms'] or float('nan'):.3f} ms\n")
    w_("  call            pairs/full |  fwd ms  ratio  TFLOP/s | fwd+bwd ms  ratio\n")
    for r in rows:
        fb = f"{r['fwd_bwd_ms']:10.3f} {r['fwd_bwd_ratio']:6.3f}" if r["fwd_bwd_ms"] else "         -      -"
        w_(f"  {r['name']:15s} {r['pairs_ratio']:10.3f} | {r['fwd_ms']:7.3f} {r['fwd_ratio']:6.3f} "
           f"{r['fwd_tflops']:8.0f} | {fb}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
