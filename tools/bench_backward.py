"""The Triton backward's block configs side by side, beside FlexAttention's backward, on the shapes
the sliding-window bars are judged on (bf16, B=1, H=32, D=128, causal, Mistral's 4096-key window
at S=16k and 32k) and on full causal attention at S=16k (`--head-dim 64` or 256: the same at that
head dim):

    python -m flashdispatch.tools.bench_backward --out DIR       # DIR/bench_backward.json
    python -m flashdispatch.tools.bench_backward --quick         # S=16k only
    python -m flashdispatch.tools.bench_backward --quick --head-dim 64 --extra ""

Every config of the tuner's backward space at the head dim (`backward_config_space`, the default
first) and the tiles given with `--extra` (default: 64 x 128 with 8 warps and 3 stages,
FlexAttention's own backward tile on Hopper at D=128, 128 x 128 with 8 warps and 2 stages, and the
D=128 default's dk-dv tile with five other dq tiles) are timed as a direct call of the backward
launcher (dq, dk, dv from a saved out and lse, the forward not included); FlexAttention's backward
is `torch.autograd.grad` through the compiled flex_attention with the graph kept (its forward not
included either; buffer donation off, which a backward run again on one graph needs). Beside them,
each forward alone (the `tl` kernel, the Gluon kernel on Hopper, FlexAttention), so that the table
also gives forward + backward, the sum the window bar compares. Timing:
tools.timing.interleaved_median_ms (CUDA events, warm-up, L2 flushed before every call, providers
interleaved in a shuffled order per repetition, median). TFLOP/s count 10 * B * H * (visible pairs)
* D for a backward (2.5 forwards). The default's and the fastest config's time is also split by
kernel (preprocess, dk-dv, dq) from torch.profiler.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Callable

import torch

import flashdispatch
from flashdispatch import cliargs
from flashdispatch.backends.triton import configs
from flashdispatch.backends.triton.backward import attention_backward
from flashdispatch.backends.triton.forward import attention_forward
from flashdispatch.errors import NoBackendError
from flashdispatch.problem import causal_visible_pairs, window_visible_pairs

from . import timing
from .bench_variants import WINDOW, block_mask, causal, flex, sliding_window_causal

log = logging.getLogger("flashdispatch.tools.bench_backward")

B, H = 1, 32
DTYPE = torch.bfloat16


def _label(cfg: dict[str, Any]) -> str:
    """'64x128 w8 s3' for the dk-dv tile, '/ dq 128x32 w8 s3' after it where the dq kernel's own
    keys differ from the swapped pair it defaults to."""
    label = f"{cfg['BWD_BLOCK_M']}x{cfg['BWD_BLOCK_N']} w{cfg['BWD_num_warps']} s{cfg['BWD_num_stages']}"
    dq = {key: cfg.get(key, cfg[default]) for key, default in configs.DQ_KEY_DEFAULTS.items()}
    if any(dq[key] != cfg[default] for key, default in configs.DQ_KEY_DEFAULTS.items()):
        label += (f" / dq {dq['BWD_DQ_BLOCK_M']}x{dq['BWD_DQ_BLOCK_N']} w{dq['BWD_DQ_num_warps']}"
                  f" s{dq['BWD_DQ_num_stages']}")
    return label + (" atomic" if cfg.get("BWD_DQ_ATOMIC") else "")


def _visible_pairs(s: int, window: int | None) -> int:
    """Query-key pairs of causal attention over s tokens, each query seeing at most `window` keys."""
    return causal_visible_pairs(s, s) if window is None else window_visible_pairs(s, s, (window - 1, 0))


# dk-dv tiles, then the D=128 default's dk-dv tile with other dq tiles (query tile x key tile: the
# swapped default streams 64-key blocks past a 128-row query block)
EXTRA = ("64,128,8,3;128,128,8,2;"
         "64,128,8,3/128,32,8,3;64,128,8,3/128,64,8,2;64,128,8,3/128,64,4,3;64,128,8,3/64,64,4,3;"
         "64,128,8,3/128,128,8,2")


def parse_tiles(text: str) -> list[dict[str, Any]]:
    """'M,N,W,S[/M,N,W,S];...' -> backward configs: query tile, key tile, warps, stages of the dk-dv
    kernel, then, after a '/', of the dq kernel (query tile, key tile, warps, stages; default: the
    dk-dv tiles swapped)."""
    tiles = []
    for part in filter(None, text.split(";")):
        try:
            fields = [[int(x) for x in half.split(",")] for half in part.split("/")]
            if len(fields) > 2 or any(len(f) != 4 for f in fields):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected M,N,WARPS,STAGES[/M,N,WARPS,STAGES][;...], got {part!r}") from None
        m, n, w, st = fields[0]
        cfg: dict[str, Any] = {"BWD_BLOCK_M": m, "BWD_BLOCK_N": n, "BWD_num_warps": w, "BWD_num_stages": st,
                               "BWD_DQ_ATOMIC": False}
        if len(fields) == 2:
            cfg.update(zip(configs.DQ_KEY_DEFAULTS, fields[1]))
        tiles.append(cfg)
    return tiles


def kernel_split(fn: Callable[[], object], calls: int = 10) -> dict[str, float]:
    """One backward call's GPU time split by kernel (ms per call: the mean over `calls` calls of
    torch.profiler's CUDA activity): which of preprocess, dk-dv and dq to work on."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    except RuntimeError as e:  # a profiler this torch build or driver does not give: the timings still stand
        log.warning("no kernel split: %s", e)
        return {}
    split: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0.0)
        if us and ev.key.startswith("_bwd_"):
            split[ev.key] = us / 1e3 / calls
    return split


def one_shape(s: int, window: int | None, rep_ms: float, extra: list[dict[str, Any]],
              head_dim: int = 128) -> dict[str, Any]:
    """Times every backward config and the anchors at one shape; returns the JSON row."""
    g = torch.Generator(device="cuda").manual_seed(s)
    q, k, v = (torch.randn(B, H, s, head_dim, device="cuda", dtype=DTYPE, generator=g) for _ in range(3))
    do = torch.randn(B, H, s, head_dim, device="cuda", dtype=DTYPE, generator=g)
    scale = head_dim ** -0.5
    win = (window - 1, 0) if window else None
    out, lse = attention_forward(q, k, v, causal=True, scale=scale, config={}, window=win)

    space = configs.backward_config_space(head_dim, head_dim, arch=configs.arch_of_tensor(q))  # the default first
    default = space[0]
    space += [c for c in extra if _label(c) not in {_label(x) for x in space}]
    fns: dict[str, tuple[Callable[[], object], list[torch.Tensor] | None]] = {}
    for cfg in space:
        fns[f"bwd {_label(cfg)}"] = (
            lambda cfg=cfg: attention_backward(do, q, k, v, out, lse, causal=True, scale=scale, config=cfg,
                                               window=win), None)

    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    bm = block_mask(sliding_window_causal if window else causal, s)
    f = flex()
    out_flex = f(qg, kg, vg, block_mask=bm)
    fns["bwd flex"] = (lambda: torch.autograd.grad(out_flex, (qg, kg, vg), do, retain_graph=True), None)
    with torch.no_grad():
        fns["fwd tl"] = (lambda: attention_forward(q, k, v, causal=True, scale=scale, config={}, window=win), None)
        fns["fwd flex"] = (lambda: f(q, k, v, block_mask=bm), None)
        try:
            flashdispatch.attention(q, k, v, causal=True, window=win, backend="triton:gluon")
            fns["fwd gluon"] = (lambda: flashdispatch.attention(q, k, v, causal=True, window=win,
                                                                backend="triton:gluon"), None)
        except NoBackendError as e:
            log.info("without triton:gluon: %s", e)

    # every config's gradients against the default's (a config that breaks is reported, not timed)
    errors: dict[str, str] = {}
    ref = attention_backward(do, q, k, v, out, lse, causal=True, scale=scale, config=default, window=win)
    for name in [n for n in fns if n.startswith("bwd ") and n != "bwd flex"]:
        try:
            got = fns[name][0]()
            err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))  # type: ignore[arg-type]
            if not err < 0.05:
                errors[name] = f"max |grad - default's| = {err:.3g}"
        except Exception as e:  # a config that does not compile or launch here
            errors[name] = f"{type(e).__name__}: {e}"[:200]
    for name in errors:
        log.warning("%s: %s", name, errors[name])
        fns.pop(name)

    def failed(name: str, e: Exception) -> None:
        errors[name] = f"{type(e).__name__}: {e}"[:200]
        log.warning("%s failed: %s", name, e)

    ms = timing.interleaved_median_ms(fns, torch.device("cuda"), warmup_ms=10.0, rep_ms=rep_ms, failed=failed)
    pairs = _visible_pairs(s, window)
    bwd_gflop = 10 * B * H * pairs * head_dim / 1e9
    # where the default's and the fastest config's time goes, kernel by kernel
    timed = sorted((n for n in ms if n.startswith("bwd ") and n != "bwd flex"), key=lambda n: ms[n])
    split_names = dict.fromkeys([f"bwd {_label(default)}", *timed[:1]])
    kernels = {name[4:]: kernel_split(fns[name][0]) for name in split_names if name in fns}
    return {"S": s, "window": window, "head_dim": head_dim, "visible_pairs": pairs, "bwd_gflop": bwd_gflop,
            "ms": ms, "kernels": kernels, "errors": errors}


def table(rows: list[dict[str, Any]], card: str) -> str:
    d = rows[0].get("head_dim", 128) if rows else 128
    lines = [f"Triton backward configs beside FlexAttention ({card}; bf16, B={B}, H={H}, D={d}, causal)", ""]
    for row in rows:
        ms = row["ms"]
        what = f"window {row['window']}" if row["window"] else "full causal"
        fwd = min((ms[k] for k in ("fwd gluon", "fwd tl") if k in ms), default=math.nan)
        flex_total = ms.get("fwd flex", math.nan) + ms.get("bwd flex", math.nan)
        lines.append(f"S={row['S']} {what}: fwd tl {ms.get('fwd tl', math.nan):.3f} ms, "
                     f"gluon {ms.get('fwd gluon', math.nan):.3f}, flex {ms.get('fwd flex', math.nan):.3f}")
        lines.append(f"  {'backward':<22} {'ms':>8} {'TFLOP/s':>8} {'vs flex bwd':>12} {'fwd+bwd vs flex':>16}")
        for name in sorted((n for n in ms if n.startswith("bwd ")), key=lambda n: ms[n]):
            t = ms[name]
            lines.append(f"  {name[4:]:<22} {t:8.3f} {row['bwd_gflop'] / t:8.1f} "
                         f"{ms.get('bwd flex', math.nan) / t:11.2f}x {flex_total / (fwd + t):15.2f}x")
        for label, split in row.get("kernels", {}).items():
            parts = ", ".join(f"{k.removeprefix('_bwd_').removesuffix('_kernel')} {v:.3f}" for k, v in split.items())
            lines.append(f"  kernels of {label} (ms per call): {parts}")
        for name, err in row["errors"].items():
            lines.append(f"  {name}: {err}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashdispatch.tools.bench_backward",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for bench_backward.json")
    p.add_argument("--quick", action="store_true", help="S=16k only")
    p.add_argument("--head-dim", type=int, choices=(64, 128, 256), default=128, help="head dim (default 128)")
    p.add_argument("--extra", type=parse_tiles, default=parse_tiles(EXTRA),
                   help=f"more tiles to time, dk-dv M,N,WARPS,STAGES then optionally /dq M,N,WARPS,STAGES; "
                        f"';' between configs (default {EXTRA!r}; '' for none)")
    p.add_argument("--rep-ms", type=cliargs.float_at_least(1.0, "milliseconds >= 1"), default=150.0,
                   help="timed milliseconds per provider and shape")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_backward: needs a CUDA GPU (none here)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # FlexAttention's backward is timed again and again on one graph (retain_graph), which a compiled
    # backward that donates its saved buffers refuses: no donation in this process (forwards unchanged)
    torch._functorch.config.donated_buffer = False
    card = torch.cuda.get_device_name()
    shapes = [(16384, WINDOW), (16384, None)] + ([] if args.quick else [(32768, WINDOW)])
    rows = []
    for s, window in shapes:
        rows.append(one_shape(s, window, args.rep_ms, args.extra, args.head_dim))
        torch.cuda.empty_cache()
    text = table(rows, card)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_backward.json"), "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
