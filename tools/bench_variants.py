"""The variants' performance bars, each timed in one run beside its anchors: sliding window, logit
softcap, attention sinks, and decode with a window.

    python -m flashdispatch.tools.bench_variants --out "$OUT"     # about 2-3 minutes on an H200
    python -m flashdispatch.tools.bench_variants --quick --only window --out "$OUT"   # the 16k window bars

Anchors, measured here in the same process as our kernel (bf16, B=1, H=32, D=128, causal):
- plain SDPA with a boolean (Sq, Sk) window mask (what users write today);
- FlexAttention compiled, its mask_mod / score_mod defined once at module level and its block
  mask built once per shape outside the timed region;
- cuDNN (torch's SDPA backend) without softcap, for the softcap bar;
- our own full causal call (window bar at 32k), our kernel without sinks (sinks bars);
- plain SDPA decoding the whole cache, and our kernel on a cache that holds only the window's keys
  (decode bars); decode calls are CUDA-graph replays.
Where the GPU is a Hopper the window bars also time our Gluon forward (backend="triton:gluon", its
gradients from the same Triton backward) against the same anchors.

Every provider's output is checked against ours (max abs difference printed) before timing;
times are medians of interleaved repetitions with the L2 flushed before each (tools/timing.py).
Prints one table (card named) and writes bench_variants.json (and bench_variants.png when
matplotlib is there) under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import flashdispatch
from flashdispatch import cliargs
from flashdispatch.errors import NoBackendError
from flashdispatch.backends.sdpa import bottom_right_sdpa
from flashdispatch.reference import attention_math, visible_mask

from . import timing
from .bench import pinned
from .decode_timing import graph_replay

log = logging.getLogger("flashdispatch.tools.bench_variants")

WINDOW = 4096  # Mistral's: window=(WINDOW - 1, 0), causal=True
SOFTCAP = 50.0  # Gemma 2's attention logit cap
B, H, D = 1, 32, 128
DECODE_HQ, DECODE_HKV, DECODE_CACHE = 32, 8, 32768
DTYPE = torch.bfloat16


# --- FlexAttention's mods: defined once, at module level (a closure per call would recompile) ----


def sliding_window_causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


def tanh_softcap(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return SOFTCAP * torch.tanh(score / SOFTCAP)


_FLEX: Any = None


def flex() -> Any:
    """flex_attention compiled once (torch.compile caches the graph per shape)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def block_mask(mask_mod: Callable[..., Any], s: int) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, None, s, s, device="cuda")


# --- one bar --------------------------------------------------------------------------------------


@dataclass
class Bar:
    """ours / anchor timed together; passes when anchor_ms / ours_ms >= min_speedup (a speed-up
    bar) or ours_ms / anchor_ms <= max_time_ratio (a time bar)."""

    name: str
    shape: str
    ours: str
    anchor: str
    ours_ms: float = math.nan
    anchor_ms: float = math.nan
    min_speedup: float | None = None
    max_time_ratio: float | None = None
    max_err: float = math.nan
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.anchor_ms / self.ours_ms if self.ours_ms > 0 else math.nan

    @property
    def passed(self) -> bool:
        if self.min_speedup is not None:
            return self.speedup >= self.min_speedup
        if self.max_time_ratio is not None:
            return self.ours_ms / self.anchor_ms <= self.max_time_ratio
        return False

    def target(self) -> str:
        if self.min_speedup is not None:
            return f">= {self.min_speedup:g}x"
        return f"time <= {self.max_time_ratio:g}x"


@dataclass
class Run:
    card: str
    torch: str
    triton: str
    flashdispatch: str
    bars: list[Bar] = field(default_factory=list)
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _randn(*shape: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=DTYPE).requires_grad_(grad)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _measure(run: Run, key: str, fns: dict[str, tuple[Callable[[], Any], list[torch.Tensor] | None]],
             rep_ms: float) -> dict[str, float]:
    def failed(name: str, e: Exception) -> None:
        run.errors[f"{key}/{name}"] = f"{type(e).__name__}: {e}"[:300]
        log.warning("%s/%s failed: %s", key, name, e)

    t0 = time.perf_counter()
    ms = timing.interleaved_median_ms(fns, torch.device("cuda"), warmup_ms=10.0, rep_ms=rep_ms, failed=failed)
    run.times[key] = ms
    log.info("%s: %s (%.1f s)", key, {k: round(v, 4) for k, v in ms.items()}, time.perf_counter() - t0)
    return ms


def _fwd_bwd(fn: Callable[[], torch.Tensor], do: torch.Tensor) -> Callable[[], None]:
    def go() -> None:
        fn().backward(do)
    return go


# --- the bars ---------------------------------------------------------------------------------


def window_bars(run: Run, s: int, rep_ms: float, with_backward: bool) -> None:
    q, k, v = _randn(B, H, s, D, grad=True), _randn(B, H, s, D, grad=True), _randn(B, H, s, D, grad=True)
    do = torch.randn_like(q)
    win = (WINDOW - 1, 0)
    mask = visible_mask(s, s, causal=True, window=win, device="cuda")
    bm = block_mask(sliding_window_causal, s)
    f = flex()
    ours = lambda: flashdispatch.attention(q, k, v, causal=True, window=win, backend="triton")  # noqa: E731
    fx = lambda: f(q, k, v, block_mask=bm)  # noqa: E731
    sdpa_mask = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    full = lambda: flashdispatch.attention(q, k, v, causal=True, backend="triton")  # noqa: E731
    gluon = lambda: flashdispatch.attention(q, k, v, causal=True, window=win, backend="triton:gluon")  # noqa: E731
    with torch.no_grad():
        ref = ours()
        err_flex = _err(fx(), ref)
        err_sdpa = _err(sdpa_mask(), ref)
        fns = {"ours": (ours, None), "flex": (fx, None), "sdpa_mask": (sdpa_mask, None)}
        try:  # the Gluon forward serves Hopper only: elsewhere its bars are left out
            err_gluon = _err(gluon(), ref)
            fns["ours_gluon"] = (gluon, None)
        except NoBackendError as e:
            log.info("window bars without triton:gluon: %s", e)
        if s >= 32768:
            fns["ours_full_causal"] = (full, None)
        ms = _measure(run, f"window-fwd-{s}", fns, rep_ms)
    shape = f"S={s} window={WINDOW}"
    run.bars.append(Bar("window fwd vs FlexAttention", shape, "triton", "flex", ms.get("ours", math.nan),
                        ms.get("flex", math.nan), min_speedup=1.3, max_err=err_flex))
    run.bars.append(Bar("window fwd vs SDPA + bool mask", shape, "triton", "sdpa_mask", ms.get("ours", math.nan),
                        ms.get("sdpa_mask", math.nan), min_speedup=3.0, max_err=err_sdpa))
    if "ours_gluon" in fns:
        run.bars.append(Bar("window fwd (gluon) vs FlexAttention", shape, "triton:gluon", "flex",
                            ms.get("ours_gluon", math.nan), ms.get("flex", math.nan), min_speedup=1.3,
                            max_err=err_gluon))
    if "ours_full_causal" in ms:
        run.bars.append(Bar("window fwd vs our full causal", shape, "triton", "triton causal",
                            ms.get("ours", math.nan), ms["ours_full_causal"], max_time_ratio=0.4))
    if with_backward:
        grads = [q, k, v]
        fns_bwd = {"ours": (_fwd_bwd(ours, do), grads), "flex": (_fwd_bwd(fx, do), grads),
                   "sdpa_mask": (_fwd_bwd(sdpa_mask, do), grads)}
        if "ours_gluon" in fns:
            fns_bwd["ours_gluon"] = (_fwd_bwd(gluon, do), grads)
        ms = _measure(run, f"window-fwd_bwd-{s}", fns_bwd, rep_ms)
        run.bars.append(Bar("window fwd+bwd vs FlexAttention", shape, "triton", "flex", ms.get("ours", math.nan),
                            ms.get("flex", math.nan), min_speedup=1.2))
        run.bars.append(Bar("window fwd+bwd vs SDPA + bool mask", shape, "triton", "sdpa_mask",
                            ms.get("ours", math.nan), ms.get("sdpa_mask", math.nan), min_speedup=3.0))
        if "ours_gluon" in fns_bwd:
            run.bars.append(Bar("window fwd+bwd (gluon) vs FlexAttention", shape, "triton:gluon", "flex",
                                ms.get("ours_gluon", math.nan), ms.get("flex", math.nan), min_speedup=1.2))
    del mask, bm


def softcap_bars(run: Run, s: int, rep_ms: float) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _randn(B, H, s, D), _randn(B, H, s, D), _randn(B, H, s, D)
    bm = block_mask(causal, s)
    f = flex()
    ours = lambda: flashdispatch.attention(q, k, v, causal=True, softcap=SOFTCAP, backend="triton")  # noqa: E731
    fx = lambda: f(q, k, v, score_mod=tanh_softcap, block_mask=bm)  # noqa: E731

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return bottom_right_sdpa(q, k, v, causal=True)

    with torch.no_grad():
        err = _err(fx(), ours())
        ms = _measure(run, f"softcap-fwd-{s}", {"ours": (ours, None), "flex": (fx, None),
                                                 "cudnn_no_softcap": (cudnn, None)}, rep_ms)
    shape = f"S={s} softcap={SOFTCAP:g}"
    run.bars.append(Bar("softcap fwd vs FlexAttention score_mod", shape, "triton", "flex", ms.get("ours", math.nan),
                        ms.get("flex", math.nan), min_speedup=2.0, max_err=err))
    run.bars.append(Bar("softcap fwd vs cuDNN without softcap", shape, "triton", "cudnn", ms.get("ours", math.nan),
                        ms.get("cudnn_no_softcap", math.nan), min_speedup=0.7))


def sinks_bars(run: Run, s: int, rep_ms: float) -> None:
    q, k, v = _randn(B, H, s, D), _randn(B, H, s, D), _randn(B, H, s, D)
    sinks = torch.randn(H, device="cuda", dtype=torch.float32)
    with_s = lambda: flashdispatch.attention(q, k, v, causal=True, sinks=sinks, backend="triton")  # noqa: E731
    # the same implementation without sinks: forcing the family "triton" would hand a plain causal
    # call to the Gluon kernel (the family's best there), which does not take sinks
    plain = pinned("triton", causal=True)
    without = lambda: plain(q, k, v)  # noqa: E731
    with torch.no_grad():
        ms = _measure(run, f"sinks-fwd-{s}", {"ours": (with_s, None), "ours_no_sinks": (without, None)}, rep_ms)
    run.bars.append(Bar("sinks fwd vs same kernel without", f"S={s}", "triton+sinks", "triton",
                        ms.get("ours", math.nan), ms.get("ours_no_sinks", math.nan), max_time_ratio=1.05))


def decode_bars(run: Run, batch: int, rep_ms: float, sinks_too: bool) -> None:
    q = torch.randn(batch, DECODE_HQ, 1, D, device="cuda", dtype=DTYPE)
    k = torch.randn(batch, DECODE_HKV, DECODE_CACHE, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    win = (WINDOW - 1, 0)
    sinks = torch.randn(DECODE_HQ, device="cuda", dtype=torch.float32)
    full = pinned("triton", causal=True)  # the kernel the window and sinks calls run, not the family's pick
    # the window's own keys as a cache of their own: what a call whose time follows the window costs
    kw, vw = k[:, :, -WINDOW:].contiguous(), v[:, :, -WINDOW:].contiguous()
    calls: dict[str, Callable[[], Any]] = {
        "ours_window": lambda: flashdispatch.attention(q, k, v, causal=True, window=win, backend="triton"),
        "ours_full": lambda: full(q, k, v),
        "ours_window_cache": lambda: full(q, kw, vw),
        # not a bar: plain SDPA's own kernel on the window's keys (the sdpa fallback's one-row path),
        # logged with the times for the selection to learn from
        "sdpa_window": lambda: flashdispatch.attention(q, k, v, causal=True, window=win, backend="sdpa"),
        "sdpa_full": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    if sinks_too:
        calls["ours_full_sinks"] = lambda: flashdispatch.attention(q, k, v, causal=True, sinks=sinks,
                                                                   backend="triton")
    with torch.no_grad():
        ref = attention_math(q, k[:, :, -WINDOW:], v[:, :, -WINDOW:], causal=True,
                                                     upcast=False)[0]
        err = _err(calls["ours_window"](), ref)
        fns = {}
        for name, fn in calls.items():
            try:
                fns[name] = (graph_replay(fn), None)
            except Exception as e:  # report, keep the others
                run.errors[f"decode-b{batch}/{name}"] = f"graph capture: {type(e).__name__}: {e}"[:300]
        ms = _measure(run, f"decode-b{batch}", fns, rep_ms)
    shape = f"B={batch} cache={DECODE_CACHE} window={WINDOW}"
    run.bars.append(Bar("decode window vs SDPA whole cache", shape, "triton", "sdpa",
                        ms.get("ours_window", math.nan), ms.get("sdpa_full", math.nan), min_speedup=2.0,
                        max_err=err))
    # time proportional to the window: the windowed call over the 32k cache costs what the same
    # kernel costs on a cache that holds only the window's keys (its fixed cost, a launch and the
    # merge, included: at B=1 it is most of a 4096-key step), within 10%; its time over the whole
    # cache's is the note
    whole = ms.get("ours_window", math.nan) / ms.get("ours_full", math.nan)
    run.bars.append(Bar("decode window vs ours on a window-long cache", shape, "triton", f"triton {WINDOW} keys",
                        ms.get("ours_window", math.nan), ms.get("ours_window_cache", math.nan),
                        max_time_ratio=1.1, note=f"{whole:.3f}x our whole-cache call (window/cache = "
                        f"{WINDOW / DECODE_CACHE:.3f})"))
    if sinks_too:
        run.bars.append(Bar("sinks decode vs same kernel without", f"B={batch} cache={DECODE_CACHE}",
                            "triton+sinks", "triton", ms.get("ours_full_sinks", math.nan),
                            ms.get("ours_full", math.nan), max_time_ratio=1.05))


# --- report ---------------------------------------------------------------------------------------


def print_table(run: Run, file: Any = None) -> None:
    print(f"\nflashdispatch variants on {run.card} (torch {run.torch}, triton {run.triton}), bf16, "
          f"D={D}, causal; times in ms", file=file)
    head = f"{'bar':42s} {'shape':36s} {'ours':>9s} {'anchor':>9s} {'ratio':>7s} {'target':>14s}  ok"
    print(head, file=file)
    print("-" * len(head), file=file)
    for bar in run.bars:
        ratio = bar.speedup if bar.min_speedup is not None else bar.ours_ms / bar.anchor_ms
        print(f"{bar.name:42s} {bar.shape:36s} {bar.ours_ms:9.3f} {bar.anchor_ms:9.3f} {ratio:7.3f} "
              f"{bar.target():>14s}  {'PASS' if bar.passed else 'FAIL'}", file=file)
    for key, err in run.errors.items():
        print(f"error {key}: {err}", file=file)
    n_pass = sum(b.passed for b in run.bars)
    print(f"{n_pass}/{len(run.bars)} bars pass on {run.card}", file=file)


def plot(run: Run, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    labels = [f"{b.name}\n{b.shape}" for b in run.bars]
    ratios = [b.speedup for b in run.bars]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    colors = ["tab:green" if b.passed else "tab:red" for b in run.bars]
    ax.barh(range(len(labels)), ratios, color=colors)
    for i, b in enumerate(run.bars):
        goal = b.min_speedup if b.min_speedup is not None else 1.0 / (b.max_time_ratio or 1.0)
        ax.plot([goal, goal], [i - 0.4, i + 0.4], color="black")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("anchor time / our time (black: the bar)")
    ax.set_title(f"flashdispatch variants, {run.card}, bf16 D={D}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SECTIONS = ("window", "softcap", "sinks", "decode")


def _sections(text: str) -> frozenset[str]:
    names = frozenset(x.strip() for x in text.split(",") if x.strip())
    unknown = sorted(names - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(SECTIONS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None, prog: str = "bench_variants") -> int:
    """The variants section; `prog` names the command in a user error (`flashdispatch bench` when
    it runs this for --variants)."""
    ap = cliargs.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for bench_variants.json/.png (the GPU runner: \"$OUT\")")
    ap.add_argument("--rep-ms", type=cliargs.milliseconds, default=60.0, help="timed milliseconds per provider and bar")
    ap.add_argument("--quick", action="store_true", help="16k window and 8k softcap/sinks bars, decode B=8 only")
    ap.add_argument("--only", type=_sections, default=None,
                    help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    args = ap.parse_args(argv)
    cliargs.show_logs(logging.INFO)
    if not torch.cuda.is_available():
        return cliargs.user_error(prog, ValueError(
            "--variants: the variants section times its bars against CUDA anchors (FlexAttention, cuDNN); torch sees "
            "no CUDA GPU here"))
    import triton

    run = Run(torch.cuda.get_device_name(), torch.__version__, triton.__version__,
              getattr(flashdispatch, "__version__", "?"))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("window 16k", lambda: window_bars(run, 16384, args.rep_ms, with_backward=True)),
        ("softcap 8k", lambda: softcap_bars(run, 8192, args.rep_ms)),
        ("sinks 8k", lambda: sinks_bars(run, 8192, args.rep_ms)),
        ("decode b8", lambda: decode_bars(run, 8, args.rep_ms, sinks_too=True)),
    ]
    if not args.quick:
        steps += [
            ("window 32k", lambda: window_bars(run, 32768, args.rep_ms, with_backward=True)),
            ("decode b1", lambda: decode_bars(run, 1, args.rep_ms, sinks_too=False)),
            ("decode b64", lambda: decode_bars(run, 64, args.rep_ms, sinks_too=False)),
        ]
    if args.only:
        steps = [(name, step) for name, step in steps if name.split()[0] in args.only]
    for name, step in steps:
        try:
            step()
        except Exception as e:  # one broken anchor must not hide the other bars
            run.errors[name] = f"{type(e).__name__}: {e}"[:300]
            log.exception("%s failed", name)
        torch.cuda.empty_cache()
        log.info("%s done at %.0f s", name, time.perf_counter() - t0)
    os.makedirs(args.out, exist_ok=True)
    result = asdict(run)
    for bar, row in zip(run.bars, result["bars"]):
        row.update(speedup=bar.speedup, passed=bar.passed, target=bar.target())
    with open(os.path.join(args.out, "bench_variants.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    plot(run, os.path.join(args.out, "bench_variants.png"))
    print_table(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
