"""Tuning results and the profile file they become (the schema of dispatch/profile_store.py).

`BucketResult` holds every (implementation, config) tried on one bucket; `profile_yaml` turns a
list of them into a profile: per bucket the candidates that passed, fastest measured first, their
median ms and the best config per backend. `unmeasured_profile` writes the same schema from an
argued ranking, without times, for devices we cannot measure (tools/figures.py).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from flashdispatch.device import simulated_device
from flashdispatch.problem import problem_from_shape
from flashdispatch.profile_store import SCHEMA_VERSION
from flashdispatch.registry import REGISTRY

from .shapes import Shape

TOOL = "flashdispatch tune"

# --- results ----------------------------------------------------------------------------------


@dataclass
class Trial:
    """One (implementation, config) on one bucket."""

    name: str
    config: dict[str, Any]
    status: str  # "ok" | "abandoned" | "wrong" | "error"
    ms: float | None = None
    note: str = ""


@dataclass
class BucketResult:
    id: str
    shape: Shape
    match: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why it cannot serve
    seconds: float = 0.0

    def best(self) -> dict[str, Trial]:
        """Fastest timed config per implementation."""
        out: dict[str, Trial] = {}
        for t in self.trials:
            if t.ms is None or t.status not in ("ok", "abandoned"):
                continue
            if t.name not in out or t.ms < out[t.name].ms:  # type: ignore[operator]
                out[t.name] = t
        return out

    def ranking(self) -> list[str]:
        """Fastest measured first: the dispatcher's rule."""
        return [n for n, _ in sorted(self.best().items(), key=lambda kv: (kv[1].ms, kv[0]))]

    def rejected(self) -> dict[str, str]:
        """Implementations with no config that passed the check, and why."""
        best = self.best()
        out: dict[str, str] = {}
        for t in self.trials:
            if t.name not in best and t.status in ("wrong", "error"):
                out.setdefault(t.name, f"{t.status}: {t.note}")
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = self.shape._asdict()
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "BucketResult":
        return BucketResult(
            id=d["id"], shape=Shape(**d["shape"]), match=d["match"],
            trials=[Trial(**t) for t in d.get("trials", [])], skipped=dict(d.get("skipped", {})),
            seconds=float(d.get("seconds", 0.0)),
        )


def bucket_match(s: Shape) -> dict[str, Any]:
    """The profile match keys of a shape, as the dispatcher's lookup reads them."""
    causal = s.causal and s.seqlen_q > 1  # Problem.effective_causal
    m: dict[str, Any] = {
        "dtype": s.dtype, "head_dim": s.head_dim, "causal": causal,
        "gqa": s.heads_q // s.heads_kv, "pass": s.pass_, "seqlen": s.seqlen_k,
    }
    if s.seqlen_q != s.seqlen_k:
        m["seqlen_q"] = s.seqlen_q
    if s.pass_ == "decode":
        m["batch"] = s.batch  # split-KV vs not depends on how many sequences fill the GPU
    return m


def bucket_id(s: Shape) -> str:
    return f"{s.label}|" + ",".join(str(x) for x in s.dims) + f"|{s.dtype}|{int(s.causal)}|{s.pass_}"


# --- provenance and the profile file ------------------------------------------------------------


def versions() -> dict[str, str]:
    out: dict[str, str] = {"torch": torch.__version__.split("+")[0]}
    for label, dists in (("triton", ("triton",)), ("cupy", ("cupy-cuda13x", "cupy-cuda12x", "cupy"))):
        out[label] = "not installed"
        for dist in dists:
            try:
                out[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    if torch.version.hip:
        out["hip"] = str(torch.version.hip)
    return out


@dataclass
class ProfileMeta:
    key: str
    name: str
    arch: str
    card: str
    command: str
    date: str = field(default_factory=lambda: _dt.date.today().isoformat())
    measured: bool = True
    timing: str = ""
    versions: dict[str, str] = field(default_factory=versions)
    header: str = ""  # comment lines for the top of the file (without '# ')
    tool: str = TOOL


_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if x is None:
        return "null"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return json.dumps(str(x))
        text = repr(float(f"{x:.4g}"))
        mant, e, exp = text.partition("e")
        # YAML 1.1 (PyYAML) reads 1e-07 as a string: the mantissa needs a dot
        return f"{mant if '.' in mant else mant + '.0'}{e}{exp}"
    s = str(x)
    if _BARE.match(s) and s.lower() not in _YAML_WORDS:
        return s
    return json.dumps(s)


def flow(x: Any) -> str:
    """One-line YAML (a subset of JSON plus bare words) that yaml.safe_load reads back."""
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {flow(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in x) + "]"
    return _scalar(x)


def profile_yaml(results: Sequence[BucketResult], meta: ProfileMeta, *, note: str = "") -> str:
    lines = [f"# {ln}".rstrip() for ln in meta.header.splitlines()] if meta.header else []
    if not lines:
        lines = [
            f"# flashdispatch profile for {meta.card} ({meta.key}), written by `{TOOL}` on {meta.date}.",
            f"# command: {meta.command}",
            "# Per entry: the bucket the dispatcher matches on (same dtype, head_dim, causal, pass; nearest",
            "# gqa, then nearest seqlen/seqlen_q/batch on a log scale), the shape measured, every candidate",
            "# that passed the float64 check ranked fastest first with its median ms, the best config of",
            "# each tuned backend, and why the others were rejected. Regenerate: flashdispatch tune --help.",
        ]
    gen = {"date": meta.date, "tool": meta.tool, "card": meta.card, "command": meta.command, **meta.versions}
    if meta.timing:
        gen["timing"] = meta.timing
    lines += [
        f"schema: {SCHEMA_VERSION}",
        "device: " + flow({"key": meta.key, "name": meta.name, "arch": meta.arch}),
        "generated: " + flow(gen),
        f"measured: {_scalar(meta.measured)}",
    ]
    if note:
        lines.append("note: " + _scalar(note))
    lines.append("entries:" if results else "entries: []")
    for r in results:
        ranking = r.ranking()
        if not ranking:
            lines.append(f"  # {r.shape.describe()}: no candidate passed; " + flow(r.rejected()))
            continue
        best = r.best()
        s = r.shape
        lines.append("  - match: " + flow(r.match))
        lines.append("    shape: " + flow({"B": s.batch, "Hq": s.heads_q, "Hkv": s.heads_kv,
                                            "Sq": s.seqlen_q, "Sk": s.seqlen_k, "D": s.head_dim}))
        lines.append("    ranking: " + flow(ranking))
        if meta.measured:
            lines.append("    ms: " + flow({n: best[n].ms for n in ranking}))
        cfgs = {n: best[n].config for n in ranking if best[n].config}
        if cfgs:
            lines.append("    config:")
            lines += [f"      {_scalar(n)}: {flow(c)}" for n, c in cfgs.items()]
        rej = r.rejected()
        if rej:
            lines.append("    rejected: " + flow(rej))
    return "\n".join(lines) + "\n"


def unmeasured_profile(key: str, header: str, rank: Callable[[Shape], Sequence[str]], plan: Sequence[Shape],
                       command: str) -> str:
    """A profile for a device we cannot measure: rankings from an argued rule, no ms.

    Each entry ranks the implementations `rank(shape)` names that can serve the shape on the
    (simulated) device, with each one's default config for that device, so that what the file
    can select is what the compile checks (tools/aot_triton.py, tools/nvcc_check.py) verify.
    """
    dev = simulated_device(key)
    impls = REGISTRY.all()
    results = []
    for s in plan:
        p = problem_from_shape(s.dims, dtype=s.dtype, device_kind=dev.kind, causal=s.causal, needs_grad=s.needs_grad)
        trials = []
        for i, name in enumerate(rank(s)):
            impl = impls.get(name)
            if impl is None or impl.not_supported_reasons(p, dev):
                continue
            trials.append(Trial(name, dict(impl.default_config(p, dev)), "ok", float(i)))  # ms: order only
        results.append(BucketResult(bucket_id(s), s, bucket_match(s), trials))
    meta = ProfileMeta(key=key, name=dev.name, arch=dev.arch, card=f"{dev.name} (not measured)", command=command,
                       measured=False, header=header, versions={}, tool="flashdispatch.tools.figures")
    return profile_yaml(results, meta)
