"""The serving bars, each timed in one run beside its anchors (bf16, D=128, GQA 32/8):

    python -m flashdispatch.tools.bench_serving --out "$OUT"      # under 2 minutes on an H200

1. packed causal batch: 16 sequences of 256..8192 tokens (63,744 in all, in a fixed shuffled
   order), forward and forward+backward of attention_varlen (triton) against plain SDPA on the
   batch padded to 8192 (is_causal, enable_gqa) and torch's varlen_attn where this torch has it.
2. paged decode: B = 1, 8, 64, 256, contexts drawn from 512..32k (seeded), block size 16, pages
   in shuffled order. attention_kvcache (triton) against plain SDPA decoding a contiguous cache of
   the same total bytes (every sequence at the mean length: no padding, no imbalance) and against
   gather-then-SDPA (the pages gathered into a padded cache, keys past each length masked). All
   three are timed as CUDA-graph replays (GPU time); bandwidth = K/V bytes the call needs / time;
   host time per eager call beside. Value checks are off (FLASHDISPATCH_VALIDATE=off), as in a server.
3. speculative verification: Sq = 4 and 8 new tokens, B = 8 and 64, against the paged cache,
   against plain SDPA on a contiguous cache padded to the longest context with a bottom-right
   boolean mask per sequence; CUDA-graph replays.

Every provider's output is compared with ours before timing (max abs difference in the JSON);
times are medians of interleaved repetitions with the L2 flushed before each (tools/timing.py).
Prints one table last (card named, PASS/FAIL per bar) and writes bench_serving.json and
bench_serving.png (with matplotlib) under --out; `--plot-from JSON` re-renders both from a run.
`flashdispatch bench --serving` runs it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

import flashdispatch as fd
from flashdispatch import cliargs, serving
from flashdispatch.backends.sdpa_serving import torch_varlen_params
from flashdispatch.reference import cache_visible_mask

from . import timing
from .decode_timing import graph_replay

log = logging.getLogger("flashdispatch.tools.bench_serving")
DTYPE = torch.bfloat16
HQ, HKV, D = 32, 8, 128
PAGE = 16
VARLEN_LENGTHS = [256, 512, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 4608, 5120, 5632, 6144, 7168, 8192, 8192]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def varlen_bars(rows: list[dict[str, Any]], rep_ms: float) -> None:
    lengths = list(VARLEN_LENGTHS)
    random.Random(0).shuffle(lengths)
    total, bsz, smax = sum(lengths), len(lengths), max(lengths)
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(bsz)], dtype=torch.int32, device="cuda")
    q = torch.randn(total, HQ, D, device="cuda", dtype=DTYPE, requires_grad=True)
    k = torch.randn(total, HKV, D, device="cuda", dtype=DTYPE, requires_grad=True)
    v = torch.randn(total, HKV, D, device="cuda", dtype=DTYPE, requires_grad=True)
    do = torch.randn(total, HQ, D, device="cuda", dtype=DTYPE)
    # padded copies (B, H, Smax, D), right-padded: is_causal is bottom-right for every real row
    def pad(t: torch.Tensor, h: int) -> torch.Tensor:
        p = torch.zeros(bsz, smax, h, D, device="cuda", dtype=DTYPE)
        for b, n in enumerate(lengths):
            p[b, :n] = t.detach()[cu[b]:cu[b] + n]
        return p.transpose(1, 2).contiguous().requires_grad_(True)

    qp, kp, vp = pad(q, HQ), pad(k, HKV), pad(v, HKV)
    dop = pad(do, HQ).detach()
    real_rows = torch.cat([torch.arange(n, device="cuda") + b * smax for b, n in enumerate(lengths)])

    def ours() -> torch.Tensor:
        return fd.attention_varlen(q, k, v, cu, cu, smax, smax, causal=True, backend="triton")

    def padded() -> torch.Tensor:
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)

    calls: dict[str, Callable[[], torch.Tensor]] = {"triton varlen": ours, "sdpa padded": padded}
    params = torch_varlen_params()
    if params and ("window_size" in params or "is_causal" in params):
        from torch.nn.attention.varlen import varlen_attn

        kw: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
            kx, vx = k, v
        else:  # a torch without GQA in varlen_attn: the kv heads expanded once, outside the timing
            kx = k.detach().repeat_interleave(HQ // HKV, 1).requires_grad_(True)
            vx = v.detach().repeat_interleave(HQ // HKV, 1).requires_grad_(True)
        calls["torch varlen_attn"] = lambda: varlen_attn(q, kx, vx, cu, cu, smax, smax, **kw)
    with torch.no_grad():
        ref = ours()
        checks = {}
        for name, fn in calls.items():
            o = fn()
            if o.dim() == 4:  # padded (B, H, S, D) back to packed rows
                o = o.transpose(1, 2).reshape(bsz * smax, HQ, D)[real_rows]
            checks[name] = _diff(o, ref)
    fwd = {}
    with torch.no_grad():
        fwd = timing.interleaved_median_ms({n: (f, None) for n, f in calls.items()}, torch.device("cuda"),
                                           rep_ms=rep_ms, failed=lambda n, e: log.warning("%s failed: %s", n, e))

    def with_bwd(fn: Callable[[], torch.Tensor], padded_grad: bool) -> Callable[[], None]:
        def step() -> None:
            o = fn()
            o.backward(dop if padded_grad else do)
        return step

    leaves = {"sdpa padded": [qp, kp, vp], "triton varlen": [q, k, v]}
    if "torch varlen_attn" in calls:
        leaves["torch varlen_attn"] = [q, kx, vx]
    train = {n: (with_bwd(f, n == "sdpa padded"), leaves[n]) for n, f in calls.items()}
    both = timing.interleaved_median_ms(train, torch.device("cuda"), rep_ms=rep_ms,
                                        failed=lambda n, e: log.warning("%s fwd+bwd failed: %s", n, e))
    for pass_, times in (("fwd", fwd), ("fwd+bwd", both)):
        ours_ms = times.get("triton varlen")
        for name, ms in times.items():
            if name == "triton varlen":
                continue
            rows.append({"bar": "varlen causal 16 seqs 256..8192", "case": f"{total} tokens", "pass": pass_,
                         "anchor": name, "ours_ms": ours_ms, "anchor_ms": ms,
                         "speedup": (ms / ours_ms) if ours_ms else None, "max_abs_diff": checks.get(name),
                         "need": 1.5 if name == "sdpa padded" else 1.0})
    del qp, kp, vp, dop, q, k, v, do
    torch.cuda.empty_cache()


def _paged_cache(lengths: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz = len(lengths)
    max_blocks = -(-max(lengths) // PAGE)
    need = sum(-(-n // PAGE) for n in lengths)
    nblocks = need + 8
    k = torch.randn(nblocks, PAGE, HKV, D, device="cuda", dtype=DTYPE, generator=g)
    v = torch.randn(nblocks, PAGE, HKV, D, device="cuda", dtype=DTYPE, generator=g)
    perm = torch.randperm(nblocks, device="cuda", generator=g).int()
    table = torch.zeros(bsz, max_blocks, dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(lengths):
        nb = -(-n // PAGE)
        table[b, :nb] = perm[used:used + nb]
        used += nb
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    return k, v, table, lens


def _fold(q: torch.Tensor) -> torch.Tensor:
    """(B, Sq, Hq, D) -> (B, Hkv, G * Sq, D): each kv head's query group as rows of one head, so
    that SDPA runs GQA as plain multi-head attention on any of its kernels (rows ordered g, i)."""
    bsz, sq = q.shape[0], q.shape[1]
    return q.view(bsz, sq, HKV, HQ // HKV, D).permute(0, 2, 3, 1, 4).reshape(bsz, HKV, HQ // HKV * sq, D)


def _unfold(o: torch.Tensor, sq: int) -> torch.Tensor:
    bsz = o.shape[0]
    return o.view(bsz, HKV, HQ // HKV, sq, D).permute(0, 3, 1, 2, 4).reshape(bsz, sq, HQ, D)


def _gather_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lengths: list[int]
                 ) -> torch.Tensor:
    """What a user without a paged kernel writes for decode: gather each sequence's pages into a
    contiguous cache, then SDPA (lengths known on the host, as a server has them)."""
    outs = []
    qf = _fold(q)
    for b, n in enumerate(lengths):
        pages = table[b, :-(-n // PAGE)].long()
        kb = k[pages].flatten(0, 1)[:n].transpose(0, 1).unsqueeze(0)
        vb = v[pages].flatten(0, 1)[:n].transpose(0, 1).unsqueeze(0)
        outs.append(F.scaled_dot_product_attention(qf[b:b + 1], kb, vb))
    return _unfold(torch.cat(outs, 0), q.shape[1])


def decode_bars(rows: list[dict[str, Any]], batch: int, sq: int, rep_ms: float, anchors: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(batch * 10 + sq)
    rng = random.Random(batch * 10 + sq)
    lengths = [32768] if batch == 1 else [rng.randint(512, 32768) for _ in range(batch)]
    k, v, table, lens = _paged_cache(lengths, g)
    q = torch.randn(batch, sq, HQ, D, device="cuda", dtype=DTYPE, generator=g)

    def ours() -> torch.Tensor:
        return fd.attention_kvcache(q, k, v, cache_seqlens=lens, block_table=table, backend="triton")

    calls: dict[str, Callable[[], Any]] = {"triton paged": ours}
    checks: dict[str, float] = {}
    ref = ours()
    bytes_needed = sum(lengths) * HKV * D * 2 * 2
    if anchors == "decode":
        mean = sum(lengths) // batch
        kc = torch.randn(batch, HKV, mean, D, device="cuda", dtype=DTYPE, generator=g)
        vc = torch.randn_like(kc)
        qc = _fold(q)
        calls["sdpa contiguous (same bytes)"] = lambda: F.scaled_dot_product_attention(qc, kc, vc)
        calls["gather-then-sdpa"] = lambda: _gather_sdpa(q, k, v, table, lengths)
        checks["gather-then-sdpa"] = _diff(_gather_sdpa(q, k, v, table, lengths), ref)
        anchor_bytes = {"sdpa contiguous (same bytes)": batch * mean * HKV * D * 2 * 2}
    else:
        # plain SDPA on a contiguous cache padded to the longest context, bottom-right mask per sequence
        smax = max(lengths)
        kc = torch.zeros(batch, HKV, smax, D, device="cuda", dtype=DTYPE)
        vc = torch.zeros_like(kc)
        for b, n in enumerate(lengths):
            pages = table[b, :-(-n // PAGE)].long()
            kc[b, :, :n] = k[pages].flatten(0, 1)[:n].transpose(0, 1)
            vc[b, :, :n] = v[pages].flatten(0, 1)[:n].transpose(0, 1)
        # (B, Sq, Smax) per sequence, repeated over the folded rows (g, i)
        mask = cache_visible_mask(sq, smax, lens, causal=True).repeat(1, HQ // HKV, 1).unsqueeze(1)
        qc = _fold(q)
        sdpa = lambda: F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask)  # noqa: E731
        calls["sdpa contiguous + mask"] = sdpa
        checks["sdpa contiguous + mask"] = _diff(_unfold(sdpa(), sq), ref)
        anchor_bytes = {}
    replays = {n: (graph_replay(f), None) for n, f in calls.items()}
    times = timing.interleaved_median_ms(replays, torch.device("cuda"), rep_ms=rep_ms,
                                         failed=lambda n, e: log.warning("%s failed: %s", n, e))
    host = {n: timing.host_us_per_call(f, torch.device("cuda"), calls=50) for n, f in calls.items()}
    ours_ms = times.get("triton paged")
    for name, ms in times.items():
        if name == "triton paged":
            continue
        same_bytes = name in anchor_bytes
        if same_bytes and ours_ms:
            # bandwidth ratio: our bytes per second over the anchor's
            ratio = (bytes_needed / ours_ms) / (anchor_bytes[name] / ms)
        else:
            ratio = ms / ours_ms if ours_ms else None
        rows.append({"bar": "paged decode" if anchors == "decode" else "speculative verify",
                     "case": f"B={batch} Sq={sq} ctx {min(lengths)}..{max(lengths)}", "pass": "graph replay",
                     "anchor": name, "ours_ms": ours_ms, "anchor_ms": ms, "speedup": ratio,
                     "metric": "bandwidth ratio" if same_bytes else "time ratio",
                     "ours_GBps": bytes_needed / ours_ms / 1e6 if ours_ms else None,
                     "host_us_ours": host.get("triton paged"), "host_us_anchor": host.get(name),
                     "max_abs_diff": checks.get(name),
                     "need": 0.9 if same_bytes else (2.0 if name == "gather-then-sdpa" else 1.5)})
    del k, v, kc, vc, calls, replays
    torch.cuda.empty_cache()


def passed(row: dict[str, Any]) -> bool | None:
    """Whether a row meets its bar (None: it has no ratio)."""
    if row.get("speedup") is None or row.get("need") is None:
        return None
    return bool(row["speedup"] >= row["need"])


def print_table(result: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout
    rows = result["rows"]
    print(f"\nflashdispatch serving bench on {result['card']} (torch {result['torch']}, triton {result['triton']}; "
          "bf16, D=128, GQA 32/8)", file=file)
    print(f"{'bar':<34}{'case':<34}{'pass':<14}{'anchor':<30}{'ours ms':>9}{'anchor':>9}{'ratio':>7}{'need':>6}"
          f"{'host us':>9}  ok", file=file)
    for r in rows:
        if "error" in r:
            print(f"{r['bar']:<34}ERROR {r['error']}", file=file)
            continue
        ratio = f"{r['speedup']:.2f}" if r.get("speedup") else "-"
        host = f"{r['host_us_ours']:.0f}" if r.get("host_us_ours") else ""
        ok = {True: "PASS", False: "FAIL", None: "-"}[passed(r)]
        ours = r["ours_ms"] if r.get("ours_ms") is not None else float("nan")
        print(f"{r['bar']:<34}{r['case']:<34}{r['pass']:<14}{r['anchor']:<30}{ours:>9.3f}"
              f"{r['anchor_ms']:>9.3f}{ratio:>7}{r['need']:>6}{host:>9}  {ok}", file=file)
    judged = [passed(r) for r in rows if "error" not in r and passed(r) is not None]
    errors = sum("error" in r for r in rows)
    print(f"{sum(judged)}/{len(judged)} bars pass on {result['card']}"
          + (f"; {errors} sections failed" if errors else ""), file=file)


def plot(result: dict[str, Any], path: str) -> bool:
    """One bar per (bar, case, pass, anchor): the ratio against the anchor, its need marked;
    green where it passes. False when matplotlib is not installed (the `tools` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    rows = [r for r in result["rows"] if "error" not in r and r.get("speedup")]
    if not rows:
        return False
    labels = [f"{r['bar']} {r['pass']}\n{r['case']} vs {r['anchor']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows],
            color=["tab:green" if passed(r) else "tab:red" for r in rows])
    for i, r in enumerate(rows):
        ax.plot([r["need"], r["need"]], [i - 0.4, i + 0.4], color="black")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("anchor time / our time (bandwidth ratio for the same-bytes decode anchor); black: the bar")
    ax.set_title(f"flashdispatch serving, {result['card']}, bf16 D=128 GQA 32/8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(result: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_serving.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    plot(result, os.path.join(out, "bench_serving.png"))


def main(argv: list[str] | None = None, prog: str = "bench_serving") -> int:
    """The serving section; `prog` names the command in a user error (`flashdispatch bench` when
    it runs this for --serving)."""
    ap = cliargs.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="folder for bench_serving.json/.png (the GPU runs pass \"$OUT\")")
    ap.add_argument("--rep-ms", type=cliargs.milliseconds, default=60.0)
    ap.add_argument("--plot-from", default=None, metavar="JSON",
                    help="re-render the table and plot from an earlier bench_serving.json, measure nothing")
    args = ap.parse_args(argv)
    cliargs.show_logs(logging.INFO)
    if args.plot_from:
        try:
            result = cliargs.read_json(args.plot_from, "--plot-from", "bench --serving", ("rows",))
        except ValueError as e:
            return cliargs.user_error(prog, e)
        os.makedirs(args.out, exist_ok=True)
        plot(result, os.path.join(args.out, "bench_serving.png"))
        print_table(result)
        return 0
    if not torch.cuda.is_available():
        return cliargs.user_error(prog, ValueError(
            "--serving: the serving section times CUDA kernels and CUDA-graph replays; torch sees no CUDA GPU here "
            "(--plot-from JSON re-renders a GPU's run)"))
    import triton

    rows: list[dict[str, Any]] = []
    sections: list[tuple[str, Callable[[], None]]] = [("varlen", lambda: varlen_bars(rows, args.rep_ms))]
    for b in (1, 8, 64, 256):
        sections.append((f"decode B={b}", lambda b=b: decode_bars(rows, b, 1, args.rep_ms, "decode")))
    for b in (8, 64):
        for sq in (4, 8):
            sections.append((f"spec B={b} Sq={sq}", lambda b=b, sq=sq: decode_bars(rows, b, sq, args.rep_ms, "spec")))
    for name, fn in sections:
        try:
            # as a server runs: no value checks (each would add a host sync to every timed call);
            # every provider's output is still compared with ours before timing
            with serving.validation(False):
                fn()
        except Exception as e:  # one failing section must not lose the others
            log.exception("section %s failed", name)
            rows.append({"bar": name, "error": f"{type(e).__name__}: {e}"})
            torch.cuda.empty_cache()
    card = torch.cuda.get_device_name()
    result = {"card": card, "torch": torch.__version__, "triton": triton.__version__,
              "torch_varlen_attn": sorted(torch_varlen_params()), "rows": rows}
    write_outputs(result, args.out)
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
