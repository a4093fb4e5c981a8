"""The host time that `attention()` adds over calling the chosen implementation directly.

Two readings per backend (docs/integration.md):

- with the backend: `attention()` against `impl.run()` on a problem small enough to be host-bound.
  Both sides pay the backend's own host time (25-45 us per call for a torch op on the H100 host), so
  the difference carries that time's run-to-run noise, which can exceed the difference. The
  dispatcher's plan also holds the implementation's forward bound to the signature
  (Implementation.prepare), which skips the backend's own per-call lookup of its launch; a direct
  `run()` call looks it up, so that saving shows here as less time added.
- dispatcher alone: the same two calls with the chosen implementation swapped, in the decision
  cache, for one whose `run()` returns at once. What is left is exactly the dispatcher's own path
  (key, lookup, layout handling, the call), measured without any kernel launch beside it.

Times are the calling thread's CPU time (`time.thread_time`), which does not count the time the
thread is descheduled on a shared host, and wall-clock time; each is the minimum over rounds of the
mean per call of one round's back-to-back calls, with the two sides interleaved round by round so
that drift hits both alike.

    python -m flashdispatch.tools.host_cost [--out host.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

import flashdispatch as fd
from flashdispatch.plans import PLANS
from flashdispatch.problem import Problem, problem_from_tensors
from flashdispatch.registry import REGISTRY

# (B, Hq, Hkv, S, D): the launch-bound end of real use (one decode step of a small model)
SHAPE = (1, 2, 2, 16, 64)


@dataclass
class HostCost:
    backend: str
    grad: bool
    attention_us: float  # thread CPU time per attention() call
    run_us: float  # ... per impl.run() call
    added_us: float
    attention_wall_us: float
    run_wall_us: float
    added_wall_us: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call(fn: Callable[[], Any], calls: int, device: torch.device) -> tuple[float, float]:
    """(thread CPU us, wall us) per call over `calls` back-to-back calls."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    c1, t1 = time.thread_time(), time.perf_counter()
    return (c1 - c0) / calls * 1e6, (t1 - t0) / calls * 1e6


def compare(via_dispatch: Callable[[], Any], direct: Callable[[], Any], device: torch.device,
            calls: int = 500, rounds: int = 7, warmup: int = 20) -> tuple[tuple[float, float], tuple[float, float]]:
    """((cpu, wall) of via_dispatch, (cpu, wall) of direct) per call, minimum over rounds."""
    for f in (via_dispatch, direct):
        for _ in range(warmup):
            f()
    seen: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate which side runs first
        for i in order:
            seen[i].append(_per_call((via_dispatch, direct)[i], calls, device))
    _sync(device)
    best = [(min(c for c, _ in seen[i]), min(w for _, w in seen[i])) for i in (0, 1)]
    return best[0], best[1]


class _Immediate:
    """Stands in for an implementation in the decision cache: run() returns at once, so what
    remains of an attention() call is the dispatcher's own path."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem,
            config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return q, None


def _row(backend: str, grad: bool, a: tuple[float, float], r: tuple[float, float]) -> HostCost:
    return HostCost(backend, grad, round(a[0], 2), round(r[0], 2), round(a[0] - r[0], 2),
                    round(a[1], 2), round(r[1], 2), round(a[1] - r[1], 2))


def measure(backend: str, grad: bool, device: str | torch.device, calls: int = 500,
            rounds: int = 7) -> Iterator[HostCost]:
    """Yields the row with the backend, then the dispatcher-alone row (named '<variant> alone').
    Raises NoBackendError when `backend` cannot serve the problem on `device`."""
    device = torch.device(device)
    b, hq, hkv, s, d = SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=grad) for h in (hq, hkv, hkv))
    decision = fd.explain(q, k, v, causal=True, backend=backend)
    impl = REGISTRY.get(decision.variant)
    p = problem_from_tensors(q, k, v, causal=True, scale=None, layout="bhsd", return_lse=False)
    with fd.use_backend(backend):
        def via_dispatch() -> Any:
            return fd.attention(q, k, v, causal=True)

        def direct() -> Any:
            return impl.run(q, k, v, p, decision.config)

        yield _row(decision.variant, grad, *compare(via_dispatch, direct, device, calls, rounds))
        via_dispatch()  # the decision is cached under this thread's key before the swap
        stand_in = _Immediate(impl.name)
        with PLANS.running_instead(impl, stand_in):  # the cached plans run the stand-in
            def alone() -> Any:
                return stand_in.run(q, k, v, p, decision.config)

            yield _row(decision.variant + " alone", grad, *compare(via_dispatch, alone, device, calls * 10, rounds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", nargs="+", default=list(REGISTRY.families()),
                    help="backends to measure: families, or implementations such as triton:gluon (default: every "
                         "family of the registry)")
    ap.add_argument("--out", help="JSON file, rewritten after every row")
    ap.add_argument("--calls", type=int, default=500, help="back-to-back calls per reading (x10 alone)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved readings per side; the minimum is kept")
    args = ap.parse_args(argv)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "shape": SHAPE, "calls": args.calls,
                              "rounds": args.rounds, "rows": []}
    print(f"host time per call on {name} (torch {torch.__version__}), us, min over rounds "
          "(thread CPU time | wall clock)", flush=True)
    print(f"{'backend':22s} {'grad':5s} {'attention()':>11s} {'run()':>7s} {'added':>6s} | "
          f"{'attention()':>11s} {'run()':>7s} {'added':>6s}", flush=True)
    for backend in args.backends:
        for grad in (False, True):
            try:
                rows = list(measure(backend, grad, args.device, args.calls, args.rounds))
            except fd.NoBackendError as e:
                result["rows"].append({"backend": backend, "grad": grad, "skipped": str(e)})
                print(f"{backend:22s} {str(grad):5s} skipped: {str(e).splitlines()[0]}", flush=True)
                continue
            for r in rows:
                result["rows"].append(asdict(r))
                print(f"{r.backend:22s} {str(r.grad):5s} {r.attention_us:11.2f} {r.run_us:7.2f} {r.added_us:6.2f} | "
                      f"{r.attention_wall_us:11.2f} {r.run_wall_us:7.2f} {r.added_wall_us:6.2f}", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
