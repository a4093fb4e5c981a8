"""Serving and packed training: variable-length batches and (paged) KV caches.

    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, ...)
    attention_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table=None, ...)

flash_attn's conventions: packed (total_tokens, H, D) tensors, int32 cu_seqlens of B + 1 entries
starting at 0; a KV cache (B, Smax, Hkv, D), or pages (num_blocks, block_size, Hkv, D) with an int32
block_table (B, max_blocks); causal is bottom-right within each sequence.

Backends come from the registry, like the dense ones (`serving_backends()`): a family's
implementation gives its serving module (Implementation.serving_module), which says, for a
`ServingProblem`, why it cannot serve it (the sentences `explain_varlen` / `explain_kvcache` and
`NoBackendError` show). triton runs our kernels (backends/triton/varlen.py, paged.py); sdpa is the correct fallback
(torch's varlen_attn where the installed torch has the needed arguments, else a loop over the
sequences; the KV cache through a gather and one masked attention); cupy declines with its reason.
Forcing works as for `attention()`: the backend argument, `use_backend()`, FLASHDISPATCH_BACKEND.

Validation. Checks of shapes, dtypes and devices run on every call (host metadata only). Checks of
the values in cu_seqlens, cache_seqlens and block_table read device tensors: they run in one
place, `check_values`, on an eager call, and are skipped
- when FLASHDISPATCH_VALIDATE=off (the hot path of a server), or inside `with validation(False):`,
- always while a CUDA graph is captured or torch.compile traces (a host read would break both).
With validation off nothing in `attention_kvcache` reads a device tensor on the host (its triton
path and its sdpa fallback alike); `attention_varlen`'s per-sequence sdpa loop does (it says so).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch

from . import envs, selection
from .device import DEVICE_KEYS, DeviceInfo, current_device
from .errors import NoBackendError
from .costmodel import GroupKey, problem_pass, serving_class, variant_kind
from .problem import (
    DTYPE_NAMES, NO_WINDOW, Problem, check_bool, check_scale, check_sinks, check_softcap, check_window,
    normalised_window,
)
from .registry import REGISTRY
from .selection import Decision, current_forced, device_for, simulated_or_none, state

log = logging.getLogger("flashdispatch")

__all__ = ["attention_varlen", "attention_kvcache", "explain_varlen", "explain_kvcache", "ServingProblem",
           "check_values", "validation", "serving_backends", "select_serving", "varlen_problem", "kvcache_problem"]


class ServingProblem(NamedTuple):
    """What selection needs of a varlen or KV-cache call: shapes and options, never values.

    `problem`: the dense Problem of the call's shapes (B sequences of max_seqlen_q x max_seqlen_k
    for varlen, of Sq x the cache's capacity for kvcache; the variants normalised as attention()
    stores them); its fields read through this record (sp.batch, sp.scale, ...), with the window
    and softcap in the calls' own convention (None when absent). block_size 0: a contiguous cache
    (or varlen); tokens_q / tokens_k: the packed rows (varlen: total_q, total_k; kvcache: B x Sq,
    B x capacity), the work the cost model counts."""

    kind: str  # "varlen" | "kvcache"
    problem: Problem
    block_size: int = 0
    tokens_q: int = 0
    tokens_k: int = 0

    # the dense record's facts, read through
    @property
    def device_kind(self) -> str: return self.problem.device_kind  # noqa: E704

    @property
    def device_index(self) -> int: return self.problem.device_index  # noqa: E704

    @property
    def dtype(self) -> torch.dtype: return self.problem.dtype  # noqa: E704

    @property
    def batch(self) -> int: return self.problem.batch  # noqa: E704

    @property
    def heads_q(self) -> int: return self.problem.heads_q  # noqa: E704

    @property
    def heads_kv(self) -> int: return self.problem.heads_kv  # noqa: E704

    @property
    def seqlen_q(self) -> int: return self.problem.seqlen_q  # noqa: E704

    @property
    def seqlen_k(self) -> int: return self.problem.seqlen_k  # noqa: E704

    @property
    def head_dim(self) -> int: return self.problem.head_dim  # noqa: E704

    @property
    def head_dim_v(self) -> int: return self.problem.head_dim_v  # noqa: E704

    @property
    def causal(self) -> bool: return self.problem.causal  # noqa: E704

    @property
    def scale(self) -> float: return self.problem.scale  # noqa: E704

    @property
    def sinks(self) -> bool: return self.problem.sinks  # noqa: E704

    @property
    def needs_grad(self) -> bool: return self.problem.needs_grad  # noqa: E704

    @property
    def return_lse(self) -> bool: return self.problem.return_lse  # noqa: E704

    @property
    def window(self) -> tuple[int, int] | None:
        return None if self.problem.window == NO_WINDOW else self.problem.window

    @property
    def softcap(self) -> float | None:
        return self.problem.softcap or None

    def evolve(self, **changes: Any) -> "ServingProblem":
        """A copy with fields of this record or of its problem changed (needs_grad=..., device_kind=...);
        window and softcap in the calls' convention (None: none), stored normalised as a new call's."""
        own = {k: changes.pop(k) for k in list(changes) if k in self._fields}
        if {"window", "causal", "softcap"} & changes.keys():
            causal = bool(changes.get("causal", self.causal))
            changes["window"] = normalised_window(changes.get("window", self.window), causal)
            changes["softcap"] = changes.get("softcap", self.softcap) or 0.0
        return self._replace(problem=self.problem._replace(**changes), **own) if changes else self._replace(**own)

    def work(self) -> Problem:
        """The dense problem of the same work, for the cost model: B sequences of the mean packed
        lengths (varlen), or of Sq rows against the whole capacity (kvcache: the lengths are on the
        device, and selection never reads them), with the call's variants."""
        if self.kind != "varlen":
            return self.problem
        b = max(1, self.batch)
        return self.problem._replace(seqlen_q=max(1, round(self.tokens_q / b)), seqlen_k=max(1, round(self.tokens_k / b)))

    def model_key(self) -> GroupKey:
        """The cost model's group for this call (a serving class: dispatch/costmodel.py)."""
        w = self.work()
        return GroupKey(problem_pass(w), serving_class(self.kind, self.seqlen_q), variant_kind(w), w.dtype_name,
                        self.head_dim)

    def describe(self) -> str:
        cache = (f", paged cache block_size={self.block_size}" if self.block_size else
                 (", contiguous cache" if self.kind == "kvcache" else ""))
        extras = "".join([f", window={self.window}" if self.window else "",
                          f", softcap={self.softcap}" if self.softcap else "", ", sinks" if self.sinks else ""])
        tokens = f" total_q={self.tokens_q} total_k={self.tokens_k}" if self.kind == "varlen" and self.tokens_q else ""
        return (f"{self.kind} B={self.batch}{tokens} Hq={self.heads_q} Hkv={self.heads_kv} "
                f"{'max_seqlen_q' if self.kind == 'varlen' else 'Sq'}={self.seqlen_q} "
                f"{'max_seqlen_k' if self.kind == 'varlen' else 'capacity'}={self.seqlen_k} D={self.head_dim}"
                f"{'' if self.head_dim_v == self.head_dim else f' Dv={self.head_dim_v}'} "
                f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))} causal={self.causal}{extras}{cache} "
                f"{self.device_kind}{' requires_grad' if self.needs_grad else ''}"
                f"{' return_lse' if self.return_lse else ''}")

    def dense(self) -> Problem:
        """The plain dense Problem of the same shapes (no variants), for the dense capability checks
        (dtype, device, head dims, GQA, backward, lse)."""
        return self.problem._replace(window=NO_WINDOW, softcap=0.0, sinks=False)


# --- validation ----------------------------------------------------------------------------------


def _tensor(name: str, t: Any, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {tuple(t.shape)}")
    return t


def _int(name: str, x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {x!r}")
    return x


def _variant_args(q: torch.Tensor, heads_q: int, scale: float | None, window: Any, softcap: Any,
                  sinks: Any, causal: Any, return_lse: Any) -> tuple[float, tuple[int, int] | None, float | None]:
    """The arguments shared with attention(), checked by attention()'s own rules: (scale, window
    with (-1, -1) as None, softcap)."""
    scale = check_scale(scale, q.shape[-1])
    check_bool("causal", causal)
    check_bool("return_lse", return_lse)
    win = check_window(window)
    if win == (-1, -1):
        win = None
    cap = check_softcap(softcap)
    check_sinks(sinks, heads_q, q.device)
    return scale, win, cap


def _same(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")


def _check_varlen(q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: Any, max_k: Any) -> None:
    """Shapes, dtypes and devices: host metadata only."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _tensor(name, t, 3)
    for name, t in (("k", k), ("v", v)):
        _same(name, t, q)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"v: expected {k.shape[0]} rows like k, got {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"v: expected {k.shape[1]} heads like k, got {v.shape[1]}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected head dim {q.shape[2]} like q, got {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k: expected a number of heads that divides q's {q.shape[1]}, got {k.shape[1]}")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        _tensor(name, t, 1)
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} like q, got {t.device}")
        if t.shape[0] < 1:
            raise ValueError(f"{name}: expected B + 1 >= 1 entries, got none")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_k: expected {cu_q.shape[0]} entries like cu_seqlens_q, got {cu_k.shape[0]}")
    _int("max_seqlen_q", max_q)
    _int("max_seqlen_k", max_k)


def _check_kvcache(q: Any, k_cache: Any, v_cache: Any, cache_seqlens: Any, block_table: Any) -> None:
    _tensor("q", q, 4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(name, t, 4)
        _same(name, t, q)
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"v_cache: expected leading shape {tuple(k_cache.shape[:3])} like k_cache, got "
                         f"{tuple(v_cache.shape[:3])}")
    if k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"k_cache: expected head dim {q.shape[3]} like q, got {k_cache.shape[3]}")
    if k_cache.shape[2] == 0 or q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"k_cache: expected a number of heads that divides q's {q.shape[2]}, got {k_cache.shape[2]}")
    _tensor("cache_seqlens", cache_seqlens, 1)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: expected dtype torch.int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape[0] != q.shape[0] or cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: expected ({q.shape[0]},) on {q.device}, got {tuple(cache_seqlens.shape)} "
                         f"on {cache_seqlens.device}")
    if q.shape[1] < 1:
        raise ValueError(f"q: expected Sq >= 1 new queries per sequence, got shape {tuple(q.shape)}")
    if block_table is None:
        if k_cache.shape[0] != q.shape[0]:
            raise ValueError(f"k_cache: expected batch {q.shape[0]} like q (a contiguous cache; pass block_table "
                             f"for a paged one), got {k_cache.shape[0]}")
        return
    _tensor("block_table", block_table, 2)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table: expected dtype torch.int32, got {block_table.dtype}")
    if block_table.shape[0] != q.shape[0] or block_table.device != q.device:
        raise ValueError(f"block_table: expected ({q.shape[0]}, max_blocks) on {q.device}, got "
                         f"{tuple(block_table.shape)} on {block_table.device}")


_validation_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar("flashdispatch_validation",
                                                                                  default=None)


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Turn the value checks on or off for calls in this thread inside the block, over
    FLASHDISPATCH_VALIDATE (captures and traces skip them regardless)."""
    token = _validation_override.set(bool(enabled))
    try:
        yield
    finally:
        _validation_override.reset(token)


def _validation_on() -> bool:
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    override = _validation_override.get()
    return _validate_setting() if override is None else override


def _serving_cache() -> dict[Any, Any]:
    """This module's decisions and settings, kept with the dispatcher's snapshot (selection.state()),
    so that flashdispatch.refresh(), which drops the snapshot, drops them too."""
    return state().serving


def _validate_setting() -> bool:
    cache = _serving_cache()
    on = cache.get("validate")
    if on is None:
        on = cache["validate"] = envs.FLASHDISPATCH_VALIDATE.read() == "on"
    return on


def check_values(*, cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                 total_q: int = 0, total_k: int = 0, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                 cache_seqlens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                 capacity: int = 0, block_size: int = 0, num_blocks: int = 0) -> None:
    """The checks that read device values, in one place: reductions on the device, then one small
    host read per call (the offending entry is looked up only once something is wrong). Raises
    ValueError naming the argument. Called by the public functions unless validation is off."""
    if cu_seqlens_q is not None and cu_seqlens_k is not None:
        cus = torch.stack([cu_seqlens_q, cu_seqlens_k]).long()
        diffs = cus.diff(dim=1)
        empty = diffs.shape[1] == 0
        summary = torch.stack([cus[:, 0], cus[:, -1],
                               diffs.min(dim=1).values if not empty else cus[:, 0] * 0,
                               diffs.max(dim=1).values if not empty else cus[:, 0] * 0], 1).tolist()
        for (first, last, low, high), name, cu, total, most, max_name in zip(
                summary, ("cu_seqlens_q", "cu_seqlens_k"), (cu_seqlens_q, cu_seqlens_k), (total_q, total_k),
                (max_seqlen_q, max_seqlen_k), ("max_seqlen_q", "max_seqlen_k")):
            if first != 0:
                raise ValueError(f"{name}: expected a first entry of 0, got {first}")
            if low < 0:
                vals = cu.tolist()
                i = next(i for i in range(len(vals) - 1) if vals[i + 1] < vals[i])
                raise ValueError(f"{name}: expected non-decreasing entries, got {vals[i]} then {vals[i + 1]} "
                                 f"at index {i}")
            if last != total:
                raise ValueError(f"{name}: expected a last entry equal to the {total} packed rows, got {last}")
            if high > most:
                raise ValueError(f"{max_name}: expected at least the longest sequence, {high}, got {most}")
    if cache_seqlens is not None:
        lens = cache_seqlens.long()
        out_of_range = (lens < 0) | (lens > capacity)
        checks = [out_of_range.any()]
        if block_table is not None:
            pages_used = (lens.clamp(0, capacity) + block_size - 1) // block_size
            used = torch.arange(block_table.shape[1], device=lens.device).view(1, -1) < pages_used.view(-1, 1)
            bad_page = used & ((block_table < 0) | (block_table >= num_blocks))
            checks.append(bad_page.any())
        flags = torch.stack(checks).tolist()
        if flags[0]:
            i = int(out_of_range.nonzero()[0, 0])
            raise ValueError(f"cache_seqlens: expected lengths in [0, {capacity}] (the cache's capacity), got "
                             f"{int(lens[i])} for sequence {i}")
        if len(flags) > 1 and flags[1]:
            b, j = (int(x) for x in bad_page.nonzero()[0])
            raise ValueError(f"block_table: expected entries in [0, {num_blocks}) for the pages sequence {b} "
                             f"uses, got {int(block_table[b, j])} at [{b}, {j}]")


# --- backends as data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingBackend:
    """One family as the serving layer sees it, derived from its implementation in the registry
    (the one named like the family): whether it has a varlen / KV-cache path
    (Implementation.serving_module: the calls, why it cannot serve a problem, what explain() says),
    the module when it is usable here, and how it runs sliding window, softcap and sinks (for the
    cost model): fused in the kernel, or by `variants_run_as`'s plain path over the whole score
    matrix and its mask (explicit math)."""

    name: str
    impl: Any
    has_path: bool
    module: Any  # the serving module; None without a path or when the family is unavailable here
    unavailable: str | None

    @property
    def fuses_variants(self) -> bool:
        return bool(getattr(self.module, "FUSES_VARIANTS", False))

    @property
    def variants_run_as(self) -> str:
        return str(getattr(self.module, "VARIANTS_RUN_AS", ""))

    def reasons(self, sp: ServingProblem, dev: DeviceInfo) -> list[str]:
        r = [f"unavailable: {self.unavailable}"] if self.unavailable else []
        if not self.has_path:
            what = "packed varlen batches" if sp.kind == "varlen" else "KV caches (contiguous or paged)"
            r.append(f"{what} are not implemented in the {self.name} backend (dense (B, H, S, D) calls only)")
        elif self.module is not None and hasattr(self.module, "serving_reasons"):
            r += self.module.serving_reasons(self.impl, sp, dev)
        return r

    def notes(self, sp: ServingProblem, dev: DeviceInfo) -> list[str]:
        if self.module is None or not hasattr(self.module, "serving_notes"):
            return []
        return list(self.module.serving_notes(self.impl, sp, dev))

    def order_key(self, dev: DeviceInfo) -> tuple[int, int, int]:
        """The built-in order: families with a serving path first; among them, those that run
        natively on the device before emulated ones (Triton on a CPU), our kernels before the
        fallback."""
        emulated = self.module is not None and self.impl.capabilities(dev).emulated
        return (int(not self.has_path), int(bool(emulated)), int(bool(getattr(self.module, "FALLBACK", False))))


def serving_backends() -> dict[str, ServingBackend]:
    """Every family of the registry as a ServingBackend, in registration order."""
    out: dict[str, ServingBackend] = {}
    impls = REGISTRY.all()
    for family in REGISTRY.families():
        impl = impls.get(family)
        if impl is None:
            out[family] = ServingBackend(family, None, False, None, "no implementation named like the family")
            continue
        why = REGISTRY.availability(family)
        if why is None:  # available: its serving module imports (an error here is a bug, raised)
            module = impl.serving_module()
            has_path = module is not None
        else:
            try:
                has_path = impl.serving_module() is not None
            except Exception:  # it needs what this process lacks (triton, say): a path, unusable here
                has_path = True
            module = None
        out[family] = ServingBackend(family, impl, has_path, module, why)
    return out


def serving_order(backends: dict[str, ServingBackend], dev: DeviceInfo) -> tuple[str, ...]:
    """The families in the built-in order for dev (stable: registration order breaks ties)."""
    return tuple(sorted(backends, key=lambda n: backends[n].order_key(dev)))


def select_serving(sp: ServingProblem, backend: str | None = None, *, device: DeviceInfo | None = None) -> Decision:
    """The Decision for a varlen/kvcache problem: forcing as for attention(), then the profile's
    model or the built-in order. `device` answers for another (simulated) device; None means the
    device holding the tensors."""
    forced, source = current_forced(backend, state().settings)
    if device is not None:
        sp = sp.evolve(device_kind=device.kind, device_index=0)
    cache = _serving_cache()
    key = (sp, forced, source, device)
    d = cache.get(key)
    if d is None:
        d = _select(sp, forced, source, device)
        if len(cache) >= selection.MAX_CACHED:
            cache.clear()
        cache[key] = d
    return d


def _select(sp: ServingProblem, forced: str | None, source: str, device: DeviceInfo | None = None) -> Decision:
    dev = device if device is not None else device_for(sp.dense())
    rejected: dict[str, list[str]] = {}
    backends = serving_backends()
    order = serving_order(backends, dev)
    family = forced.split(":")[0] if forced else None
    ok = []
    for name in order:
        if forced is not None and name != family:
            rejected[name] = [f"not the forced backend {forced!r} (set by {source})"]
            continue
        if forced is not None and forced != family:
            rejected[name] = [f"{forced!r} pins one dense kernel; varlen and KV-cache calls take the "
                              f"family {family!r}"]
            continue
        reasons = backends[name].reasons(sp, dev)
        if reasons:
            rejected[name] = reasons
        else:
            ok.append(name)
    if not ok:
        raise NoBackendError(sp, dev, rejected, forced=forced, source=source)  # type: ignore[arg-type]
    profile, notes = selection.profile_for(dev)
    rk = _rank(sp, ok, profile, order, backends) if forced is None else None
    chosen = rk.ordered[0] if rk is not None else ok[0]
    notes = backends[chosen].notes(sp, dev) + notes
    if rk is not None:
        notes += rk.notes
    elif forced is None:
        label = sp.model_key().label()
        notes.append(f"the profile has no model for {label}: the built-in order decided" if profile and profile.measured
                     else "no measured profile for this device: the built-in order decided")
    return Decision(backend=chosen, variant=chosen, config={},
                    source=source if forced else (rk.source if rk is not None else "default"),
                    rejected=rejected, problem=sp, device=dev,  # type: ignore[arg-type]
                    candidates=tuple(rk.ordered) if rk is not None else tuple(ok), notes=tuple(notes),
                    profile=profile.provenance() if profile else None,
                    predicted=rk.predicted if rk is not None else {},
                    predictions=tuple(rk.predictions) if rk is not None else (),
                    margin=rk.margin if rk is not None else None,
                    uncertain=(rk.uncertain if rk is not None else
                               ("no model for this problem" if forced is None and profile and profile.measured else "")))


def _rank(sp: ServingProblem, ok: list[str], profile: Any, order: tuple[str, ...],
          backends: dict[str, ServingBackend]) -> Any:
    """The serving families by the profile's model of the call's class (None: no model says)."""
    if profile is None or not profile.measured:
        return None
    key = sp.model_key()

    def variant_path(name: str) -> tuple[bool, str]:
        b = backends[name]
        return (True, "") if key.variant == "plain" else (b.fuses_variants, b.variants_run_as)

    return selection.rank_by_model(sp.work(), key, ok, profile, variant_path=variant_path,
                                   default_order=lambda names: [n for n in order if n in names],
                                   baseline="the sdpa fallback")


# --- problems ------------------------------------------------------------------------------------


def _device_kind(t: torch.Tensor) -> str:
    if t.is_cuda:
        return "rocm" if torch.version.hip else "cuda"
    return "cpu"


def varlen_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, max_q: int, max_k: int,
                   causal: bool, scale: float, window: tuple[int, int] | None, softcap: float | None,
                   sinks: torch.Tensor | None, return_lse: bool) -> ServingProblem:
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (sinks is not None and sinks.requires_grad))
    p = Problem(_device_kind(q), q.device.index or 0, q.dtype, cu_q.shape[0] - 1, q.shape[1], k.shape[1], int(max_q),
                int(max_k), q.shape[2], v.shape[2], bool(causal), scale, "bshd", True, bool(grad), bool(return_lse),
                normalised_window(window, bool(causal)), softcap or 0.0, sinks is not None)
    return ServingProblem("varlen", p, 0, q.shape[0], k.shape[0])


def kvcache_problem(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
                    causal: bool, scale: float, window: tuple[int, int] | None, softcap: float | None,
                    sinks: torch.Tensor | None, return_lse: bool) -> ServingProblem:
    grad = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad
                                        or (sinks is not None and sinks.requires_grad))
    page = int(k_cache.shape[1]) if block_table is not None else 0
    capacity = block_table.shape[1] * page if block_table is not None else int(k_cache.shape[1])
    p = Problem(_device_kind(q), q.device.index or 0, q.dtype, q.shape[0], q.shape[2], k_cache.shape[2], q.shape[1],
                capacity, q.shape[3], v_cache.shape[3], bool(causal), scale, "bshd", True, bool(grad), bool(return_lse),
                normalised_window(window, bool(causal)), softcap or 0.0, sinks is not None)
    return ServingProblem("kvcache", p, page, q.shape[0] * q.shape[1], q.shape[0] * capacity)


# --- the public calls ----------------------------------------------------------------------------


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a batch of sequences packed without padding.

    Arguments:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv); one dtype and device, Hq a
            multiple of Hkv (GQA).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), starting at 0, non-decreasing, ending at
            total_q / total_k: sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q against
            rows cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v.
        max_seqlen_q, max_seqlen_k: at least the longest sequence (host ints: they size the grid).
        causal: bottom-right within each sequence (query i of a sequence of Sq queries and Sk keys
            sees key j iff j <= i + Sk - Sq). window, softcap, sinks: as `attention`.
        return_lse: also return lse (Hq, total_q) float32, natural log (no gradient).
        backend: force "triton" or "sdpa" (the fallback); a forced backend never falls back.

    Returns out (total_q, Hq, Dv) in q's dtype (with return_lse, (out, lse)). Differentiable in q,
    k, v (and sinks).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, window, softcap = _variant_args(q, q.shape[1], scale, window, softcap, sinks, causal, return_lse)
    if _validation_on():
        check_values(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, total_q=q.shape[0], total_k=k.shape[0],
                     max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    sp = varlen_problem(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, sinks,
                        return_lse)
    if torch.compiler.is_compiling():
        from . import serving_ops

        out, lse = serving_ops.traced_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, sp, sinks, backend)
    else:
        d = select_serving(sp, backend)
        out, lse = run_varlen(d.variant, q, k, v, cu_seqlens_q, cu_seqlens_k, sp, sinks)
    return (out, lse) if return_lse else out


def attention_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries against a KV cache: decode (Sq = 1), speculative verification,
    chunked prefill. Forward only.

    Arguments:
        q: (B, Sq, Hq, D), Sq >= 1; the new tokens' keys and values are already in the cache.
        k_cache, v_cache: (B, Smax, Hkv, D) / (B, Smax, Hkv, Dv), or with block_table pages
            (num_blocks, block_size, Hkv, D): key j of sequence b is row j % block_size of page
            block_table[b, j // block_size].
        cache_seqlens: int32 (B,): keys per sequence, at most the capacity (Smax, or max_blocks x
            block_size).
        block_table: int32 (B, max_blocks) or None (a contiguous cache).
        causal: bottom-right: query i sees key j iff j <= i + cache_seqlens[b] - Sq.
        window, softcap, sinks, return_lse (lse (B, Hq, Sq)), backend: as `attention_varlen`.

    CUDA graphs: with FLASHDISPATCH_VALIDATE=off (or inside the capture, where validation is
    always skipped) nothing here reads a device tensor on the host, and grid and allocations
    depend on shapes only: capture once, replay with new cache_seqlens and block_table values.
    """
    _check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)
    scale, window, softcap = _variant_args(q, q.shape[2], scale, window, softcap, sinks, causal, return_lse)
    sp = kvcache_problem(q, k_cache, v_cache, block_table, causal, scale, window, softcap, sinks, return_lse)
    if _validation_on():
        check_values(cache_seqlens=cache_seqlens, block_table=block_table, capacity=sp.seqlen_k,
                     block_size=sp.block_size, num_blocks=k_cache.shape[0])
    if torch.compiler.is_compiling():
        from . import serving_ops

        out, lse = serving_ops.traced_kvcache(q, k_cache, v_cache, cache_seqlens, block_table, sp, sinks, backend)
    else:
        d = select_serving(sp, backend)
        out, lse = run_kvcache(d.variant, q, k_cache, v_cache, cache_seqlens, block_table, sp, sinks)
    return (out, lse) if return_lse else out


def explain_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                   scale: float | None = None, window: tuple[int, int] | None = None, softcap: float | None = None,
                   sinks: torch.Tensor | None = None, return_lse: bool = False,
                   backend: str | None = None, device: str | None = None) -> Decision:
    """Which backend `attention_varlen` would run for these arguments, and why (reads no values).
    `device` names a device key ("h100", "mi300x", ...) to answer for a device that is not present
    (FLASHDISPATCH_DEVICE does the same); meta tensors plan without memory (for this machine's
    current device unless `device` says otherwise)."""
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, window, softcap = _variant_args(q, q.shape[1], scale, window, softcap, sinks, causal, return_lse)
    return select_serving(varlen_problem(q, k, v, cu_seqlens_q, max_seqlen_q, max_seqlen_k, causal, scale, window,
                                         softcap, sinks, return_lse), backend, device=_simulated(device, q))


def explain_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None = None, causal: bool = True, scale: float | None = None,
                    window: tuple[int, int] | None = None, softcap: float | None = None,
                    sinks: torch.Tensor | None = None, return_lse: bool = False,
                    backend: str | None = None, device: str | None = None) -> Decision:
    """Which backend `attention_kvcache` would run for these arguments, and why (reads no values).
    `device`: as `explain_varlen`."""
    _check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table)
    scale, window, softcap = _variant_args(q, q.shape[2], scale, window, softcap, sinks, causal, return_lse)
    return select_serving(kvcache_problem(q, k_cache, v_cache, block_table, causal, scale, window, softcap, sinks,
                                          return_lse), backend, device=_simulated(device, q))


def _simulated(key: str | None, q: torch.Tensor) -> DeviceInfo | None:
    """explain's device: a device key, else FLASHDISPATCH_DEVICE, else this machine's current device
    for meta tensors (planning without memory), else None (the tensors' own device)."""
    if key is not None and key not in DEVICE_KEYS:
        raise ValueError(f"device: expected one of {DEVICE_KEYS}, got {key!r}")
    sim = simulated_or_none(key)
    return sim if sim is not None or not q.is_meta else current_device()


# --- running a backend -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def serving_module(name: str) -> Any:
    """The module with `name`'s varlen_forward / kvcache_forward (and varlen_backward, if any), as
    its implementation in the registry gives it."""
    mod = REGISTRY.get(name).serving_module() if name in REGISTRY.all() else None
    if mod is None:
        raise RuntimeError(f"backend {name!r} has no varlen or KV-cache path")
    return mod


def torch_varlen_reasons(sp: ServingProblem) -> list[str]:
    """Why torch's varlen_attn cannot serve sp (empty: it can); the sdpa family asks its module."""
    return serving_module("sdpa").torch_varlen_reasons(sp)


def run_varlen(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
               sp: ServingProblem, sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse (Hq, total_q)) through backend `name`; differentiable when sp.needs_grad."""
    return serving_module(name).varlen_forward(q, k, v, cu_q, cu_k, sp, sinks)


def run_kvcache(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cache_seqlens: torch.Tensor, block_table: torch.Tensor | None, sp: ServingProblem,
                sinks: torch.Tensor | None, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Sq, Hq, Dv), lse (B, Hq, Sq)) through backend `name`; reads no device value on the host."""
    return serving_module(name).kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table, sp, sinks, out)
