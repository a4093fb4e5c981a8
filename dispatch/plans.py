"""The plan cache: from a call's signature to a prepared plan, with one owner.

A `Plan` is what a call needs after the first call like it: the validated Problem, the
implementation selection chose, its config, and that implementation's forward bound to the
signature (`Implementation.prepare`, when it has one: the backend then looks nothing up per
call). `PLANS` (a `PlanCache`) keeps them for eager calls
(`lookup`, attention()'s hot path) and for the custom ops that run under torch.compile
(`op_plan`); it owns their bounds, the generation that a `refresh()` bumps, and the compiled
guards in front of the signature keys. Nothing else keeps a copy of a decision per call.

Eager lookup, fastest first:
1. `recent`: the call's options (causal, scale, layout, return_lse, backend, forced block, grad
   mode) -> the plan of the last signature seen with them, with a torch `TensorGuards` over that
   call's q, k, v (one C++ check, dispatch/guards.py). A pass implies the key below would match.
2. `by_key`: the signature (shapes, dtypes, devices, last strides, options, the thread's forced
   backend, whether a gradient is needed) -> plan. A few attribute reads and one dict lookup.
3. otherwise: build the Problem (validation), select(), and remember the plan.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any, Iterator, NamedTuple

import torch

from . import autotune, selection
from .backend import NO_EXTRAS, Inputs, bound_forward, kernel_views
from .guards import AVAILABLE as _guards_on, make as make_guard
from .problem import Problem, problem_from_tensors
from .registry import REGISTRY
from .selection import select

# bound once: the hot path calls them on every call
_grad_enabled = torch.is_grad_enabled
_forced_blocks = selection.forced_blocks
_Tensor = torch.Tensor

# How often one entry may take a new guard when calls with its key arrive with other strides (the
# key reads only the last one): past that, such calls keep to the key instead of building a guard
# (about 2 us) on every call.
MAX_GUARD_REBUILDS = 2


class Plan(NamedTuple):
    """A prepared call: what the hot path keeps per call signature."""

    problem: Problem
    impl: Any  # the Implementation to run; None for an empty problem (zeros, no kernel)
    config: Any
    guard: Any  # a guards.make() over the tensors of one call with this signature, or None
    generation: int  # the snapshot it was decided under: an entry of an older one is stale
    rebuilds: int = 0  # guards built again for other strides under the same key (bounded)
    # impl.prepare() for the first call's tensors (backend.bound_forward): its forward bound to the
    # signature, which skips the backend's own per-call lookup of its launch; None: run() calls
    # forward()
    launch: Any = None


class PlanCache:
    """The one cache of prepared plans (eager and compiled paths), its bounds and its generation."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[Any, ...], Plan] = {}
        self.recent: dict[tuple[Any, ...], Plan] = {}
        # Bumped by refresh(): a plan made under an older snapshot is not used.
        self.generation = 0

    def refresh(self) -> None:
        """Forget every plan and every cached decision; re-read environment and profiles."""
        self.generation += 1  # first: a lookup in flight sees that what it decided is stale
        selection.reset()
        self.by_key.clear()
        self.recent.clear()

    def invalidate(self) -> None:
        """Forget every plan (not the profiles): the decisions behind them changed, as when autotune
        adds a measured point that any problem may borrow from. A lookup in flight sees the new
        generation and does not store what it decided."""
        self.generation += 1
        self.by_key.clear()
        self.recent.clear()

    def _put(self, cache: dict[tuple[Any, ...], Plan], key: tuple[Any, ...], plan: Plan) -> None:
        # bounded like the decision cache (selection.MAX_CACHED): a decode loop whose KV cache grows
        # by one key per step makes a new signature every step, and a compiled model with dynamic
        # shapes a new op signature per length
        if len(cache) >= selection.MAX_CACHED:
            cache.clear()
        cache[key] = plan

    def lookup(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
               layout: str, return_lse: bool, backend: str | None, window: Any = None, softcap: Any = None,
               sinks: Any = None) -> Plan:
        """attention()'s plan for this call (validating and selecting on a new signature)."""
        stack = _forced_blocks()
        grad = _grad_enabled()
        recent = self.recent
        opts = hit = None
        var: Any = None
        if window is not None or softcap is not None or sinks is not None:
            try:  # the variants as the keys hold them (sinks by shape, dtype, device and grad)
                var = _variant_key(window, softcap, sinks)
            except (AttributeError, TypeError):  # not hashable, or sinks not a tensor: validation says so
                return self._slow(q, k, v, causal, scale, layout, return_lse, backend, window, softcap, sinks)
        # Plain tensors only: a subclass (FakeTensor, a traced tensor) may carry symbolic sizes that a
        # guard compares by their example values. A guard never passes a tensor given twice, and a
        # nested tensor throws inside it (past any except, ending the process).
        if (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor
                and not (q is k or k is v or q is v or q.is_nested or k.is_nested or v.is_nested)):
            try:
                opts = (causal, scale, layout, return_lse, backend, stack[-1] if stack else None, grad, var)
                hit = recent.get(opts)
            except TypeError:  # unhashable options: the paths below sort it out
                opts = None
            if hit is not None and not hit[3].check(q, k, v):
                hit = None
        if hit is not None:
            return hit
        by_key = self.by_key
        generation = self.generation
        try:
            # is_contiguous() is the common case and cheaper than stride(); else the last stride
            # (whether a copy is needed). Devices as get_device() ints (cheaper than .device),
            # which read -1 for cpu and meta alike: non-CUDA calls add each tensor's is_meta.
            key = (
                q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
                q.is_cuda or (q.is_meta, k.is_meta, v.is_meta), q.get_device(), k.get_device(), v.get_device(),
                q.is_contiguous() or q.stride()[-1], k.is_contiguous() or k.stride()[-1],
                v.is_contiguous() or v.stride()[-1], causal, scale, layout, return_lse, backend,
                stack[-1] if stack else None,
                grad and (q.requires_grad or k.requires_grad or v.requires_grad), var,
            )
            hit = by_key.get(key)
        except (AttributeError, TypeError, RuntimeError):
            # not tensors, unhashable options, or a tensor whose metadata cannot be read this way
            # (a strided nested tensor): the slow path explains
            key, hit = None, None
        guarded = opts is not None and _guards_on
        if hit is not None and hit.generation != generation:
            hit = None  # written by a call that decided under the snapshot before a refresh()
        if hit is None:
            p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=return_lse,
                                     window=window, softcap=softcap, sinks=sinks)
            impl, config = (None, None) if p.is_empty else _decide(q, k, v, p, backend, sinks)
            launch = None if impl is None or key is None else _prepare(impl, q, k, v, p, config, sinks)
            hit = Plan(p, impl, config, make_guard(q, k, v) if guarded else None, generation, 0, launch)
            if key is not None:
                self._put(by_key, key, hit)
        elif guarded and (hit.guard is None or not hit.guard.check(q, k, v)):
            # The key matched, but the guard was built from other strides (the key reads only the
            # last one) or not at all (aliased tensors): one for these tensors, so that the next
            # call like this one passes in front; a few times per entry, not on every call.
            if hit.rebuilds < MAX_GUARD_REBUILDS:
                hit = by_key[key] = hit._replace(guard=make_guard(q, k, v), rebuilds=hit.rebuilds + 1)
            else:
                opts = None
        if opts is not None and hit.guard is not None:
            self._put(recent, opts, hit)
        if generation != self.generation:
            # a refresh() ran while this call looked up or decided under the old snapshot: what it
            # wrote is stale (refresh() bumps the generation before it empties the caches)
            self.by_key.pop(key, None)
            self.recent.pop(opts, None)
        return hit

    def _slow(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None,
              layout: str, return_lse: bool, backend: str | None, window: Any, softcap: Any, sinks: Any) -> Plan:
        """A plan made afresh and not kept: for arguments the keys cannot hold (validation raises
        for the wrong ones)."""
        p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout=layout, return_lse=return_lse,
                                 window=window, softcap=softcap, sinks=sinks)
        impl, config = (None, None) if p.is_empty else _decide(q, k, v, p, backend, sinks)
        return Plan(p, impl, config, None, self.generation)

    @contextlib.contextmanager
    def running_instead(self, impl: Any, stand_in: Any) -> Iterator[None]:
        """Inside the block, every cached plan that runs `impl` runs `stand_in` instead; restored
        after. tools/host_cost.py times the dispatcher's own path this way (a stand-in that
        returns at once)."""
        saved = [(cache, key, plan) for cache in (self.by_key, self.recent)
                 for key, plan in cache.items() if plan.impl is impl]
        for cache, key, plan in saved:
            cache[key] = plan._replace(impl=stand_in, launch=None)
        try:
            yield
        finally:
            for cache, key, plan in saved:
                cache[key] = plan

    def op_plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, config: str, forced: str,
                causal: bool, scale: float, layout: str, return_lse: bool, needs_grad: bool,
                window: tuple[int, int] | None = None, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> Plan:
        """The plan of one custom-op call (dispatch/ops.py): the ops see bhsd views beneath
        autograd, so the user's layout and whether a backward follows are passed in. variant ""
        selects for these concrete shapes; else `variant` runs with `config` (JSON). Keys start
        with "ops", apart from the eager ones."""
        key = (
            "ops", q.shape, k.shape, v.shape, q.dtype, q.device, q.stride(), k.stride(), v.stride(),
            variant, config, forced, causal, scale, layout, return_lse, needs_grad, window, softcap,
            None if sinks is None else sinks.shape,
        )
        hit = self.by_key.get(key)
        if hit is None or hit.generation != self.generation:
            generation = self.generation
            p = problem_from_tensors(q, k, v, causal=causal, scale=scale, layout="bhsd", return_lse=return_lse,
                                     window=window, softcap=softcap, sinks=sinks)
            p = p._replace(layout=layout, needs_grad=needs_grad)
            if not variant:
                d = select(p, forced)
                hit = Plan(p, REGISTRY.get(d.variant), d.config, None, generation)
            else:
                hit = Plan(p, REGISTRY.get(variant), _config_from_json(config), None, generation)
            self._put(self.by_key, key, hit)
        return hit


def _decide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, backend: str | None,
            sinks: Any) -> tuple[Any, dict[str, Any]]:
    """The implementation and config for the first eager call of a signature: selection's
    decision, or, when autotune on first use is on and the decision unsure, the decision after
    measuring this call's problem (dispatch/autotune.py; once per problem, never on a cache hit)."""
    d = select(p, backend)
    if d.uncertain or d.profile is None:
        d = autotune.after_select(q, k, v, p, d, backend, sinks)
    return REGISTRY.get(d.variant), d.config


def _prepare(impl: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem, config: dict[str, Any],
             sinks: Any) -> Any:
    """impl's bound forward (backend.bound_forward) on the tensors attention() will hand it."""
    views = kernel_views(q, k, v, p)
    return bound_forward(impl, Inputs(*views, NO_EXTRAS if sinks is None else {"sinks": sinks}), p, config)


def _variant_key(window: Any, softcap: Any, sinks: Any) -> tuple[Any, ...]:
    """What the plan keys hold of the variants: hashable (a list window becomes a tuple), and
    sinks by what validation and the needs-grad decision read. Raises TypeError/AttributeError
    for what cannot be keyed."""
    w = tuple(window) if isinstance(window, list) else window
    s = None if sinks is None else (sinks.shape, sinks.dtype, sinks.device, sinks.requires_grad)
    key = (w, softcap, s)
    hash(key)
    return key


@functools.lru_cache(maxsize=512)
def _config_from_json(text: str) -> dict[str, Any]:
    return json.loads(text) if text else {}


PLANS = PlanCache()


def refresh() -> None:
    """Re-read environment variables and profiles and forget cached decisions."""
    PLANS.refresh()
