"""Timing and work counts shared by the tuner and the benchmark (one place for each formula).

On a GPU, times are `triton.testing.do_bench` medians: a warm-up, then repetitions each preceded
by an L2 flush (a 256 MB memset), timed with device events. Without triton the same scheme runs
here with torch events. On the CPU (tests, dry runs) a perf_counter loop gives the median.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from flashdispatch.problem import Problem

log = logging.getLogger("flashdispatch.tools")

# The L2 flush buffer of the timers here: larger than any L2 we target (H100 50 MB, MI300X's
# 256 MB Infinity Cache is not flushed by it, which do_bench shares).
FLUSH_BYTES = 256 * 2**20
# Caps the CPU loop so that a slow candidate cannot stall a test.
CPU_MAX_REPS = 50
# Interleaved repetitions per provider on a CPU at least: a CPU shared with other work is
# descheduled in slices of milliseconds, and with five samples the quartiles missed that noise
# (two identical paths read 1.5x apart beyond their ranges).
CPU_MIN_REPS = 15


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """What is zeroed before each timed call: more bytes than any L2 we target."""
    return torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)


def pass_flops(p: Problem, pass_: str) -> float:
    """FLOPs of one call in this pass: FlashAttention-paper count (Problem.flops), bwd = 2.5 x fwd."""
    if pass_ == "fwd_bwd":
        return p.flops() + p.flops(backward=True)
    return p.flops()


def min_bytes(p: Problem, pass_: str) -> int:
    """The fewest bytes a forward call moves: q, k, v read once, out written once.

    fwd_bwd adds one more read of q, k, v, out and dout and the writes of dq, dk, dv.
    """
    item = torch.empty((), dtype=p.dtype).element_size()
    q = p.batch * p.heads_q * p.seqlen_q * p.head_dim
    kv = p.batch * p.heads_kv * p.seqlen_k * (p.head_dim + p.head_dim_v)
    o = p.batch * p.heads_q * p.seqlen_q * p.head_dim_v
    fwd = q + kv + o
    if pass_ == "fwd_bwd":
        return item * (fwd + (q + kv + 2 * o) + (q + kv))
    return item * fwd


# Faster than any memory reads (an HBM3e GPU reads about 5 TB/s): a graph replay that moves the
# inputs faster than this captured nothing.
GRAPH_MAX_BYTES_PER_S = 20e12


def empty_replay(p: Problem, ms: float) -> str:
    """Why a CUDA-graph replay of `p` at `ms` per call cannot have run it ("" when it can): it read
    the inputs faster than any memory (a launch on another stream is not captured, and its replay
    is empty)."""
    nbytes = min_bytes(p, "fwd")
    if ms >= nbytes / GRAPH_MAX_BYTES_PER_S * 1e3:
        return ""
    return (f"a replay read the inputs at {nbytes / max(ms, 1e-9) / 1e9:.3g} TB/s, beyond any memory: "
            "the call was not captured")


def tflops(p: Problem, pass_: str, ms: float) -> float:
    return pass_flops(p, pass_) / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def gbps(p: Problem, pass_: str, ms: float) -> float:
    return min_bytes(p, pass_) / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def rate(p: Problem, pass_: str, ms: float) -> tuple[float, str]:
    """The figure of merit: GB/s for decode (bandwidth-bound), TFLOP/s otherwise."""
    if pass_ == "decode":
        return gbps(p, pass_, ms), "GB/s"
    return tflops(p, pass_, ms), "TFLOP/s"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _cpu_median(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
                grad_to_none: Sequence[torch.Tensor] | None) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, min(CPU_MAX_REPS, int(warmup_ms / est)))):
        fn()
    times = []
    for _ in range(max(3, min(CPU_MAX_REPS, int(rep_ms / est)))):
        reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_median_events(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float,
                        grad_to_none: Sequence[torch.Tensor] | None) -> float:
    """do_bench's scheme with torch events, for machines without triton."""
    flush = _flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 5, 1e-4)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(1, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        reset_grads(grad_to_none)
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> float:
    """Median time of fn() in milliseconds after a warm-up, L2 flushed before each repetition."""
    if device.type != "cuda":
        return _cpu_median(fn, warmup_ms, rep_ms, grad_to_none)
    try:
        from triton.testing import do_bench
    except Exception:  # triton missing or broken: same scheme through torch events
        return _cuda_median_events(fn, device, warmup_ms, rep_ms, grad_to_none)
    with torch.cuda.device(device):
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []) or None,
                              return_mode="median"))


# Repetitions per provider of interleaved_median_ms: at least enough for a median, at most what
# keeps a decode-sized shape (tens of us per call) to about a second.
INTERLEAVED_REPS = (5, 1000)
# GPU cycles of device-side sleep after each flush (about 200 us at 2 GHz): slack for the host to
# enqueue the timed call before the GPU reaches it, so that a host-bound call is timed by its GPU
# work and not by its host path. The flush alone (about 55-85 us on H100/H200) is barely longer than
# a decode call's host path (20-45 us there): a 23 us call read up to 5% apart through one code path
# when the host was late. With 50 us of sleep, plain SDPA's speculative step in the demo (torch's
# lower-right CausalBias, a tensor subclass dispatched in Python on every call; an eager cuDNN call
# alone takes 70-150 us of host time) still read an upper quartile of 0.099 ms against a median of
# 0.057 on an H200, hiding a 7% difference in the spread.
HOST_SLACK_CYCLES = 400_000


class Spread(NamedTuple):
    """A provider's repetitions: median and the interquartile range (ms)."""

    median: float
    lo: float  # 25th percentile
    hi: float  # 75th percentile
    n: int

    @staticmethod
    def of(samples: Sequence[float]) -> "Spread":
        xs = sorted(samples)
        if len(xs) < 4:
            return Spread(statistics.median(xs), xs[0], xs[-1], len(xs))
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return Spread(statistics.median(xs), q1, q3, len(xs))

    def __str__(self) -> str:
        return f"{self.median:.3g} ms [{self.lo:.3g}-{self.hi:.3g}]"


def speedup(base: Spread, other: Spread) -> float | None:
    """base / other when the two differ beyond their spreads (interquartile ranges apart), else
    None: a difference inside the spread is noise, not a speed-up."""
    if other.hi < base.lo or base.hi < other.lo:
        return base.median / other.median
    return None


def interleaved_samples_ms(
    fns: Mapping[str, tuple[Callable[[], object], Sequence[torch.Tensor] | None]],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    failed: Callable[[str, Exception], None] | None = None,
    flush: bool = True,
    min_reps: int = 0,
) -> dict[str, list[float]]:
    """Every repetition's milliseconds of each provider, with the providers' repetitions
    interleaved: every repetition runs each provider once, in an order shuffled afresh for every
    repetition (seeded: reruns take the same orders); on a GPU with the L2 flushed before each call
    (flush=False: not, for CUDA-graph replays that rotate through inputs larger than L2 themselves:
    a flush would leave L2 full of dirty lines for their first reads), as do_bench does, and timed
    with events; on a CPU with perf_counter. At least `min_reps` repetitions (and the default floor).

    Why: providers timed one after another see different clocks and power states (on the H100,
    seconds of back-to-back attention slow the card down, and the same cuDNN kernel read 5-10%
    apart depending on when it was timed; a CPU's turbo and its neighbours' load drift the same
    way). Interleaved, drift hits all providers alike, which is what a ratio between them needs.
    `fns` maps a name to (fn, tensors whose .grad is reset before each call); a provider that
    raises is dropped and reported to `failed(name, error)`.
    """
    live = dict(fns)
    cuda = device.type == "cuda"

    def call(name: str) -> bool:
        if name not in live:  # dropped by an earlier failure (estimate_ms calls several times)
            return False
        fn, grads = live[name]
        try:
            reset_grads(grads)
            fn()
            return True
        except Exception as e:
            if failed is None:
                raise
            failed(name, e)
            del live[name]
            return False

    est: dict[str, float] = {}
    for name in list(live):
        call(name)  # compiles
    warm_clocks(device)  # the card idled while they compiled: estimates at idle clocks read slow
    for name in list(live):
        ms = estimate_ms(lambda n=name: call(n), device)
        if name in live:
            est[name] = max(ms, 1e-4)
    flush_buf = _flush_buffer(device) if cuda and flush else None
    cap = INTERLEAVED_REPS[1] if cuda else CPU_MAX_REPS
    for name in list(live):
        for _ in range(max(1, min(cap, int(warmup_ms / est[name])))):
            if not call(name):
                break
    if not live:
        return {}
    typical = statistics.median(est[n] for n in live)
    reps = max(INTERLEAVED_REPS[0] if cuda else CPU_MIN_REPS, min_reps, min(cap, int(rep_ms / typical)))
    order = list(live)
    shuffle = random.Random(0).shuffle
    if not cuda:
        times: dict[str, list[float]] = {n: [] for n in live}
        for _ in range(reps):
            shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                if call(name):
                    times[name].append((time.perf_counter() - t0) * 1e3)
        return {n: times[n] for n in live}
    events = {n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)] for n in live}
    for r in range(reps):
        # a fresh order every repetition: with a rotation each provider always followed the same
        # one, and on the H200 the call after a slow neighbour read 3% slower in every run
        shuffle(order)
        for name in order:
            if name not in live:
                continue
            if flush_buf is not None:
                flush_buf.zero_()
            torch.cuda._sleep(HOST_SLACK_CYCLES)
            start, end = events[name][r]
            start.record()
            if call(name):
                end.record()
    synchronize(device)
    return {n: [s.elapsed_time(e) for s, e in events[n]] for n in live}


def interleaved_median_ms(
    fns: Mapping[str, tuple[Callable[[], object], Sequence[torch.Tensor] | None]],
    device: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    failed: Callable[[str, Exception], None] | None = None,
) -> dict[str, float]:
    """Median of interleaved_samples_ms per provider."""
    got = interleaved_samples_ms(fns, device, warmup_ms=warmup_ms, rep_ms=rep_ms, failed=failed)
    return {n: statistics.median(xs) for n, xs in got.items()}


class ContextLost(RuntimeError):
    """A candidate left the CUDA context unusable; nothing after it in this process can be measured.
    `backend` names it as the tuner's state file records it (a serving family as "serving:<family>")."""

    def __init__(self, backend: str, cause: str) -> None:
        super().__init__(f"{backend} broke the CUDA context ({cause})")
        self.backend = backend


def context_alive(device: torch.device) -> bool:
    """False once the device's CUDA context is broken (an illegal address is sticky: every later
    call in this process fails, so measuring further would only record that)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return float(torch.ones(1, device=device).add_(1).item()) == 2.0
    except Exception:
        return False


# A host-only pause at least this long (a JIT compile, a float64 check on the CPU) lets the GPU drop
# to idle clocks; the timing that follows is preceded by warm_clocks.
IDLE_PAUSE_S = 0.25
# How long warm_clocks keeps the GPU saturated: do_bench's 5-25 ms warm-up does not bring an idle
# card back to its boost clock.
CLOCK_WARMUP_MS = 100.0


def warm_clocks(device: torch.device, ms: float = CLOCK_WARMUP_MS) -> None:
    """Keep the GPU busy with large matmuls for about `ms` milliseconds of wall time, so that a
    timing after a host-only pause does not start at idle clocks (on the H200 the first point of
    each tuned group, timed right after its kernels compiled, read the same cuDNN kernel up to 3x
    slower than a neighbouring provider did). No-op off CUDA."""
    if device.type != "cuda":
        return
    try:
        a = torch.empty(4096, 4096, device=device, dtype=torch.bfloat16).normal_()
        b = torch.empty_like(a)
    except torch.cuda.OutOfMemoryError:  # a shape that fills the card: time it without the warm-up
        log.debug("warm_clocks: no room for 64 MB of matmul operands; skipped")
        return
    t_end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < t_end:
        for _ in range(8):  # about 1 ms of work on an H100 / H200
            torch.mm(a, a, out=b)
        synchronize(device)
    del a, b


def warm_after_pause(device: torch.device, since: float) -> None:
    """warm_clocks when the host has been busy without the GPU since `since` (time.perf_counter)
    for longer than IDLE_PAUSE_S: the tuners call it between a candidate's checks and its timing."""
    if time.perf_counter() - since > IDLE_PAUSE_S:
        warm_clocks(device)


def estimate_ms(fn: Callable[[], object], device: torch.device, calls: int = 3) -> float:
    """Per-call time of a few back-to-back calls: a cheap estimate used to abandon hopeless
    candidates early.

    On CUDA it is read between events on the stream, not around a host synchronisation: a single
    synchronised call counts the sync's latency (about 0.1 ms), more than a whole decode call, and
    on the H100 that made the tuner abandon every decode candidate after the first one it timed.
    """
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) * 1e3 / calls
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def host_us_per_call(fn: Callable[[], object], device: torch.device, calls: int = 200) -> float:
    """Wall time per call of back-to-back calls, synchronised once at the end.

    When this exceeds the GPU time, the shape is launch-bound: the host cost is what users see.
    """
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e6 / calls


# --- CUDA-graph replay: decode and speculative steps as serving runs them ------------------------

# The input sets of one graph hold at least this many times the L2 cache's bytes, so that every
# replayed call finds its KV cache in HBM (as a layer of a multi-layer decode step does: the other
# layers' caches evicted it), and at most GRAPH_MAX_SETS sets or GRAPH_MAX_BYTES bytes.
GRAPH_L2_MULTIPLE = 2.0
GRAPH_MAX_SETS = 64
GRAPH_MAX_BYTES = 4 * 2**30
# L2 assumed where the device does not say (and on a CPU, for tests): the H100's 50 MB, rounded up.
DEFAULT_L2_BYTES = 64 * 2**20
# Replays timed: at least the first (a median), at most the second.
GRAPH_REPS = (5, 200)


class CaptureError(RuntimeError):
    """A call could not be captured in (or replayed from) a CUDA graph; time it eagerly instead."""


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            n = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
            if n > 0:
                return n
        except Exception:
            pass
    return DEFAULT_L2_BYTES


def rotation_sets(set_bytes: int, device: torch.device, *, l2: int | None = None) -> int:
    """How many distinct input sets of `set_bytes` each a graph replay rotates through: enough for
    GRAPH_L2_MULTIPLE x L2 together, at least 2, within GRAPH_MAX_SETS and GRAPH_MAX_BYTES (1 when
    a single set is already over that)."""
    l2 = l2 if l2 is not None else l2_bytes(device)
    n = math.ceil(GRAPH_L2_MULTIPLE * l2 / max(1, set_bytes))
    n = max(2, min(GRAPH_MAX_SETS, n))
    return max(1, min(n, GRAPH_MAX_BYTES // max(1, set_bytes)))


def checked_replay_ms(fns: Sequence[Callable[[], object]], device: torch.device, p: Problem, *,
                      rep_ms: float = 25.0) -> float:
    """graph_replay_ms of calls of problem `p`, raising CaptureError for an empty replay too
    (empty_replay): what the tuners time a decode or speculative step with, else eagerly."""
    ms = graph_replay_ms(fns, device, rep_ms=rep_ms)
    empty = empty_replay(p, ms)
    if empty:
        raise CaptureError(empty)
    return ms


def graph_replay_ms(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    rep_ms: float = 25.0,
    warmup_calls: int | None = None,
    reps: tuple[int, int] = GRAPH_REPS,
) -> float:
    """GPU time per call, in milliseconds, of `fns` captured in order into one CUDA graph and
    replayed: the median over replays of (replay time / len(fns)).

    The capture is tools/decode_timing.graph_replay's (its warm-up calls unless `warmup_calls`,
    then the capture, on a side stream). Give each fn its own inputs (rotation_sets says how many sets exceed L2) so that each
    call reads its cache from HBM, as the layers of a decode step do. Raises CaptureError when
    there is no CUDA device or the calls cannot be captured or replayed (a host synchronisation, a
    first-call compile, a library that refuses capture); the caller then times them eagerly, and
    says so.
    """
    if device.type != "cuda":
        raise CaptureError(f"CUDA graphs need a CUDA device, got {device}")
    if not fns:
        raise ValueError("graph_replay_ms: expected at least one call, got none")
    from .decode_timing import graph_replay  # it imports this module: imported on use

    def all_calls() -> None:
        for fn in fns:
            fn()

    try:
        with torch.cuda.device(device):
            replay = graph_replay(all_calls) if warmup_calls is None else graph_replay(all_calls, warmup_calls)
            replay()
            torch.cuda.synchronize(device)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CaptureError(f"{type(e).__name__}: {msg}") from e
    with torch.cuda.device(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            replay()
        end.record()
        end.synchronize()
        est = max(start.elapsed_time(end) / 3, 1e-4)
        n = max(reps[0], min(reps[1], int(rep_ms / est)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for s, e in events:
            s.record()
            replay()
            e.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events) / len(fns)
