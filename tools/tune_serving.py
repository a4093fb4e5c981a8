"""The tuner's serving points: `attention_varlen` and `attention_kvcache`, timed per serving family.

A serving shape of the grid (tools/shapes.py, `Shape.serving`) is measured like a dense one, but
through the public serving calls with the family forced ("triton", "sdpa": the names selection
ranks for these calls, dispatch/serving.py), so that the time is what a user's call costs, its
fallback path included:

- varlen: B packed causal sequences (shapes.varlen_lengths: a quarter to 1.75x the mean length),
  forward, or forward and backward; timed with the L2 flushed (timing.median_ms);
- kvcache: Sq new rows per sequence against a paged cache (block size shapes.SERVING_PAGE, pages in
  shuffled order), every sequence full; a step of at most DECODE_MAX_SEQLEN_Q rows is timed as a
  CUDA-graph replay over caches larger than L2 together (as serving runs it), a longer chunk
  eagerly; the eager host time per call beside it.

Before it is timed, each family's output is checked against the float64 reference on rows of the
first and the last sequence (tools/verify.py's row blocks: each sequence is a dense problem of its
own), on memory poisoned with NaN; a family that trains is checked for gradients on a small packed
proxy. Value checks of the calls themselves are off while timing (a server's hot path).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

import flashdispatch as fd
from flashdispatch import serving
from flashdispatch.errors import NoBackendError
from flashdispatch.problem import DTYPES_BY_NAME, Problem, problem_from_tensors
from flashdispatch.serving_reference import varlen_math
from flashdispatch.tolerances import within_budget

from . import timing, verify
from .decode_timing import captured_in_serving
from .profile_writer import BucketResult, Trial, bucket_id, bucket_match
from .shapes import SERVING_PAGE, Shape, varlen_lengths

log = logging.getLogger("flashdispatch.tools.tune")

# The gradient proxy: a packed batch of odd lengths (they end inside any tile), small enough for
# a float64 reference anywhere.
GRAD_PROXY_LENGTHS: tuple[int, ...] = (37, 64, 101)


# How the tuner's state file names a serving family it left out (a dense implementation keeps its name).
SERVING_PREFIX = "serving:"


def families(backends: Sequence[str], excluded: Sequence[str] = ()) -> list[str]:
    """The serving families among the tune's implementations' backends (dense families), in the
    serving registry's order, less those `excluded` names as SERVING_PREFIX + family."""
    return [f for f in serving.serving_backends() if f in set(backends) and SERVING_PREFIX + f not in excluded]


def can_serve(s: Shape, name: str, dev: Any) -> bool:
    """Whether serving family `name` declares it can serve shape `s` on `dev` (a DeviceInfo; no
    tensors, no values): what the plan's estimate counts."""
    sp = s.serving_problem(dev.kind)
    return not serving.serving_backends()[name].reasons(sp, dev)


@dataclass
class _Call:
    """A serving shape's inputs: `run(name, *set)` calls the family on input set `set` (0: the
    checked one), `sets` how many there are, `checks` (out slice, dense problem, row blocks) per
    checked sequence."""

    run: Callable[..., torch.Tensor]
    sets: list[tuple[torch.Tensor, ...]]
    checks: list[tuple[Callable[[torch.Tensor], torch.Tensor], Problem, list[verify.RowBlock]]]
    explain: Callable[[str], Any]
    grads: list[torch.Tensor]
    do: torch.Tensor | None
    out_bytes: int


def _rnd(gen: torch.Generator, device: torch.device, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    """(S, H, D) rows of one sequence as a (1, H, S, D) dense batch."""
    return t.transpose(0, 1).unsqueeze(0)


def _dense_check(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor
                 ) -> tuple[Problem, list[verify.RowBlock]]:
    p = problem_from_tensors(qs, ks, vs, causal=True, scale=None, layout="bhsd", return_lse=False)
    return p, verify.reference_blocks(qs, ks, vs, p)


def varlen_call(s: Shape, device: torch.device, gen: torch.Generator) -> _Call:
    dtype = DTYPES_BY_NAME[s.dtype]
    lengths = varlen_lengths(s.batch, s.seqlen_q)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    total, smax = bounds[-1], max(lengths)
    q = _rnd(gen, device, dtype, total, s.heads_q, s.head_dim)
    k = _rnd(gen, device, dtype, total, s.heads_kv, s.head_dim)
    v = _rnd(gen, device, dtype, total, s.heads_kv, s.head_dim)
    do = _rnd(gen, device, dtype, total, s.heads_q, s.head_dim) if s.needs_grad else None
    if s.needs_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    checks = []
    for b in sorted({0, len(lengths) - 1}):
        r0, r1 = bounds[b], bounds[b + 1]
        p, blocks = _dense_check(*(_bhsd(t[r0:r1].detach()) for t in (q, k, v)))
        checks.append((lambda out, r0=r0, r1=r1: _bhsd(out[r0:r1]), p, blocks))

    def run(name: str, qi: torch.Tensor, ki: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        return fd.attention_varlen(qi, ki, vi, cu, cu, smax, smax, causal=True, backend=name)  # type: ignore[return-value]

    def explain(name: str) -> Any:
        return fd.explain_varlen(q, k, v, cu, cu, smax, smax, causal=True, backend=name)

    return _Call(run, [(q, k, v)], checks, explain, [q, k, v] if s.needs_grad else [], do,
                 total * s.heads_q * s.head_dim * q.element_size())


def kvcache_call(s: Shape, device: torch.device, gen: torch.Generator) -> _Call:
    dtype = DTYPES_BY_NAME[s.dtype]
    pages = math.ceil(s.seqlen_k / SERVING_PAGE)
    blocks_n = s.batch * pages
    perm = torch.randperm(blocks_n, generator=torch.Generator().manual_seed(blocks_n))
    table = perm.view(s.batch, pages).to(torch.int32).to(device)
    seqlens = torch.full((s.batch,), s.seqlen_k, dtype=torch.int32, device=device)

    def one_set() -> tuple[torch.Tensor, ...]:
        return (_rnd(gen, device, dtype, s.batch, s.seqlen_q, s.heads_q, s.head_dim),
                _rnd(gen, device, dtype, blocks_n, SERVING_PAGE, s.heads_kv, s.head_dim),
                _rnd(gen, device, dtype, blocks_n, SERVING_PAGE, s.heads_kv, s.head_dim))

    first = one_set()
    graphed = captured_in_serving(s) and device.type == "cuda"
    per_set = sum(t.numel() * t.element_size() for t in first)
    sets = [first] + [one_set() for _ in range(timing.rotation_sets(per_set, device) - 1 if graphed else 0)]
    q, kc, vc = first
    checks = []
    for b in sorted({0, s.batch - 1}):
        rows = table[b].long()
        kb, vb = (c[rows].flatten(0, 1)[:s.seqlen_k] for c in (kc, vc))
        p, blocks = _dense_check(_bhsd(q[b]), _bhsd(kb), _bhsd(vb))
        checks.append((lambda out, b=b: _bhsd(out[b]), p, blocks))

    def run(name: str, qi: torch.Tensor, ki: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        return fd.attention_kvcache(qi, ki, vi, cache_seqlens=seqlens, block_table=table, causal=True,  # type: ignore[return-value]
                                    backend=name)

    def explain(name: str) -> Any:
        return fd.explain_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table, causal=True, backend=name)

    return _Call(run, sets, checks, explain, [], None, q.numel() * q.element_size())


def measure_serving_bucket(s: Shape, names: Sequence[str], device: torch.device, opts: Any, gen: torch.Generator,
                           grad_verdicts: dict[str, verify.Verdict] | None = None, *,
                           host_calls: int = 100) -> BucketResult:
    """Check, then time, every serving family in `names` that can serve shape `s` (opts: the
    tuner's TuneOptions, for warmup_ms and rep_ms; host_calls: eager calls per host-time
    measurement of a graph-timed step)."""
    t_start = time.perf_counter()
    res = BucketResult(bucket_id(s), s, bucket_match(s))
    call = varlen_call(s, device, gen) if s.serving == "varlen" else kvcache_call(s, device, gen)
    grad_verdicts = grad_verdicts if grad_verdicts is not None else {}
    for name in names:
        try:
            call.explain(name)
        except NoBackendError as e:
            res.skipped[name] = "; ".join(e.reasons.get(name) or []) or str(e).splitlines()[0]
            continue
        res.trials.append(_try_family(name, s, call, device, opts, gen, grad_verdicts, host_calls))
    res.seconds = time.perf_counter() - t_start
    return res


def _try_family(name: str, s: Shape, call: _Call, device: torch.device, opts: Any, gen: torch.Generator,
                grad_verdicts: dict[str, verify.Verdict], host_calls: int) -> Trial:
    t_host = time.perf_counter()  # checks and compiles until the timing: the GPU mostly idle
    try:
        verify.poison_allocator(call.out_bytes, device)
        with torch.no_grad():
            out = call.run(name, *call.sets[0])
        if not bool(torch.isfinite(out).all()):
            return Trial(name, {}, "wrong", note=f"{int((~torch.isfinite(out)).sum())} output elements are NaN/inf")
        worst = verify.Verdict(True, 0.0, 0.0)
        for cut, p, blocks in call.checks:
            v = verify.check_output(cut(out), p, blocks)
            if not v.ok:
                return Trial(name, {}, "wrong", note=v.reason)
            worst = v if v.error >= worst.error else worst
        del out
        if s.needs_grad:
            key = f"{name}|{s.dtype}|{s.head_dim}|{s.heads_q // s.heads_kv}"
            if key not in grad_verdicts:
                grad_verdicts[key] = check_varlen_grads(name, s, device, gen)
            if not grad_verdicts[key].ok:
                return Trial(name, {}, "wrong", note=grad_verdicts[key].reason)
        checked = f"max err {worst.error:.3g} (allowed {worst.allowed:.3g})"
        with serving.validation(False):
            return _time(name, s, call, device, opts, checked, host_calls, t_host)
    except Exception as e:  # a family that fails at this size is a result, not a crash
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if not timing.context_alive(device):  # the tuner stops and a --resume leaves the family out
            raise timing.ContextLost(SERVING_PREFIX + name, f"{type(e).__name__}: {msg}") from e
        for t in call.grads:
            t.grad = None
        return Trial(name, {}, "error", note=f"{type(e).__name__}: {msg}")


def _time(name: str, s: Shape, call: _Call, device: torch.device, opts: Any, checked: str, host_calls: int,
          t_host: float) -> Trial:
    first = call.sets[0]
    if s.needs_grad:
        do = call.do

        def fn() -> None:
            call.run(name, *first).backward(do)
    else:
        def fn() -> None:
            with torch.no_grad():
                call.run(name, *first)
    fn()
    timing.reset_grads(call.grads)
    timing.warm_after_pause(device, t_host)
    note = checked
    ms: float | None = None
    if captured_in_serving(s) and device.type == "cuda":
        def each(i: int) -> Callable[[], None]:
            return lambda: call.run(name, *call.sets[i])

        try:
            with torch.no_grad():
                ms = timing.checked_replay_ms([each(i) for i in range(len(call.sets))], device, s.problem(),
                                              rep_ms=opts.rep_ms)
            note += f"; CUDA-graph replay over {len(call.sets)} caches"
        except timing.CaptureError as e:
            if not timing.context_alive(device):
                raise
            note += f"; eager median: the call cannot be captured in a CUDA graph ({e})"
    if ms is None:
        ms = timing.median_ms(fn, device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
                              grad_to_none=call.grads or None)
        timing.reset_grads(call.grads)
    host = None
    if captured_in_serving(s):
        host = timing.host_us_per_call(fn, device, host_calls)
    return Trial(name, {}, "ok", ms, note, host_us=host)


def check_varlen_grads(name: str, s: Shape, device: torch.device, gen: torch.Generator) -> verify.Verdict:
    """dq, dk, dv of `name`'s varlen call on a small packed proxy (GRAD_PROXY_LENGTHS, the shape's
    dtype, head dim and GQA ratio, causal) against the float64 reference, within the gradient
    budget set by the same math in the input dtype."""
    dtype = DTYPES_BY_NAME[s.dtype]
    g = s.heads_q // s.heads_kv
    bounds = [0]
    for n in GRAD_PROXY_LENGTHS:
        bounds.append(bounds[-1] + n)
    total = bounds[-1]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    q = _rnd(gen, device, dtype, total, 2 * g, s.head_dim)
    k = _rnd(gen, device, dtype, total, 2, s.head_dim)
    v = _rnd(gen, device, dtype, total, 2, s.head_dim)
    do = _rnd(gen, device, dtype, total, 2 * g, s.head_dim)
    smax = max(GRAD_PROXY_LENGTHS)

    def grads(fn: Callable[..., torch.Tensor], cast: torch.dtype | None) -> list[torch.Tensor]:
        ins = [(t.to(cast) if cast else t).detach().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        out.backward(do.to(out.dtype))
        return [t.grad for t in ins]  # type: ignore[misc]

    got = grads(lambda a, b, c: fd.attention_varlen(a, b, c, cu, cu, smax, smax, causal=True, backend=name), None)
    ref = grads(lambda a, b, c: varlen_math(a, b, c, cu, cu, causal=True)[0], torch.float64)
    base = grads(lambda a, b, c: varlen_math(a, b, c, cu, cu, causal=True, upcast=False)[0], None)
    worst = verify.Verdict(True, 0.0, 0.0)
    for what, gt, rf, bs in zip(("dq", "dk", "dv"), got, ref, base):
        if gt is None:
            return verify.Verdict(False, float("nan"), 0.0, f"{what}: no gradient reached the input")
        ok, err, allowed = within_budget(gt, bs, rf, dtype, grad=True)
        if not ok:
            return verify.Verdict(False, err, allowed, f"{what} error {err:.3g} > allowed {allowed:.3g} "
                                                       f"(packed proxy {GRAD_PROXY_LENGTHS})")
        if err >= worst.error:
            worst = verify.Verdict(True, err, allowed)
    return worst

