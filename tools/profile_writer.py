"""Tuning results and the profile file they become (schema 2 of dispatch/profile_store.py).

`BucketResult` holds every (implementation, config) tried at one shape of the tune grid;
`profile_yaml` turns a list of them into a profile: every result is one measured point of the
cost model's group its shape falls in (dispatch/costmodel.py), with each implementation's best
median, the best config of each tuned implementation there and, for calls timed as CUDA-graph
replays, the eager host time per call; every group's models are fitted from its points
(`Group.refit`) before the file is written through profile_store's writer, the one source of the
schema. `unmeasured_profile` writes the same schema from an argued ranking, without times or
configs, for devices we cannot measure (tools/figures.py).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from flashdispatch.costmodel import (
    ALL_CLASSES, MODEL_PASSES, VARIANTS, Group, GroupKey, Point, features, point_problem,
)
from flashdispatch.device import simulated_device
from flashdispatch.profile_store import Profile, flow, profile_yaml_text
from flashdispatch.registry import REGISTRY

from .shapes import Shape

TOOL = "flashdispatch tune"

# --- results ----------------------------------------------------------------------------------


@dataclass
class Trial:
    """One (implementation, config) at one shape."""

    name: str
    config: dict[str, Any]
    status: str  # "ok" | "abandoned" | "wrong" | "error"
    ms: float | None = None
    note: str = ""
    host_us: float | None = None  # eager host time per call (graph-timed shapes)


@dataclass
class BucketResult:
    id: str
    shape: Shape
    match: dict[str, Any]  # the model group of the shape (bucket_match)
    trials: list[Trial] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why it cannot serve
    seconds: float = 0.0

    def best(self) -> dict[str, Trial]:
        """Fastest timed config per implementation."""
        out: dict[str, Trial] = {}
        for t in self.trials:
            if t.ms is None or t.status not in ("ok", "abandoned") or not (t.ms > 0 and math.isfinite(t.ms)):
                continue
            if t.name not in out or t.ms < out[t.name].ms:  # type: ignore[operator]
                out[t.name] = t
        return out

    def ranking(self) -> list[str]:
        """Fastest measured first."""
        return [n for n, _ in sorted(self.best().items(), key=lambda kv: (kv[1].ms, kv[0]))]

    def rejected(self) -> dict[str, str]:
        """Implementations with no config that passed the check, and why."""
        best = self.best()
        out: dict[str, str] = {}
        for t in self.trials:
            if t.name not in best and t.status in ("wrong", "error"):
                out.setdefault(t.name, f"{t.status}: {t.note}")
        return out

    def point(self, measured: bool = True) -> Point:
        """This result as a point of its group: times (or, unmeasured, the order), host times,
        and the best config of each implementation that has one."""
        s, best = self.shape, self.best()
        ranking = self.ranking()
        return Point(
            s.batch, s.heads_q, s.heads_kv, s.seqlen_q, s.seqlen_k, s.window,
            # rounded as the file writes them: the fits are then what a refit of the file gives
            ms={n: float(f"{best[n].ms:.4g}") for n in ranking} if measured else {},  # type: ignore[arg-type]
            host_us={n: float(best[n].host_us) for n in ranking  # type: ignore[arg-type]
                     if measured and best[n].host_us is not None and best[n].host_us > 0},
            ranking=() if measured else tuple(ranking),
            config={n: dict(best[n].config) for n in ranking if measured and best[n].config},
        )

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
    """The model group a shape is a point of, as the profile's `key:` writes it."""
    k = s.group
    return {"pass": k.pass_, "class": k.cls, "variant": k.variant, "dtype": k.dtype, "head_dim": k.head_dim}


def bucket_id(s: Shape) -> str:
    w = f"|w{s.window}" if s.window >= 0 else ""
    return f"{s.label}|" + ",".join(str(x) for x in s.dims) + f"|{s.dtype}|{int(s.causal)}|{s.pass_}{w}"


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
    sm_count: int = 0  # SMs (CUs) of the card: the models' wave-tail feature (0: the device table's)


MEASURED_HEADER = """\
flashdispatch profile for {card} ({key}), written by `{tool}` on {date}.
command: {command}

How to read this file. Problems are grouped by what changes how kernels behave: the pass (fwd, or
fwd_bwd when gradients are needed), the shape class (dense: no mask; causal: Sq = Sk; chunked: a
prompt chunk against a longer cache; speculative: 2-16 rows against a cache; decode: one row per
sequence; causal_tall: Sq > Sk; and for attention_varlen / attention_kvcache, whose implementations
are the serving families triton and sdpa: varlen, a packed batch of B sequences of mean length Sq = Sk;
kvcache, 1-16 new rows per sequence against a paged cache of Sk keys; kvcache_chunked, a longer chunk),
the variant (plain, or a sliding window), the dtype and the head dim. Each group lists the shapes measured (`points`: B, Hq, Hkv, Sq, Sk) with every correct
implementation's median time in milliseconds (`ms`; decode and speculative steps are CUDA-graph
replays, with the eager host time per call in `host_us`) and the best config of each tuned
backend there (`config`). `fits` is a model per implementation fitted to those points:
    time_us = overhead_us + GFLOP * us_per_gflop + GB * us_per_gb + GFLOP * wave_tail * us_per_gflop_tail
(1000 / us_per_gflop is the TFLOP/s it sustains, 1000 / us_per_gb its TB/s; rms is the relative fit
error over n points). The dispatcher predicts every eligible implementation's time from these models
(borrowing from the nearest group where a problem's own was not measured, and saying so in
`flashdispatch explain`) and runs the fastest; sdpa (plain SDPA, or the serving fallback) keeps the
call unless another is predicted faster by the larger of 2% and the two models' fit errors. Every
candidate passed a float64 check before it was timed.
Regenerate or extend: flashdispatch tune --help (docs/profiles.md)."""


UNMEASURED_HEADER = """\
flashdispatch profile for {card} ({key}) - NOT MEASURED: written by `{tool}` on {date}.
Each point holds an argued order of implementations (`ranking`, fastest first) instead of times,
and no configs (each backend runs its default for the problem). Replace it by measuring:
flashdispatch tune (docs/profiles.md)."""


def _group_config(g: Group, sm_count: int) -> dict[str, dict[str, Any]]:
    """Per implementation, the config that won at the most points (ties: the one of the largest
    point), the group's fallback for a point without its own."""
    out: dict[str, dict[str, Any]] = {}
    names: dict[str, None] = {}
    for pt in g.points:
        names.update(dict.fromkeys(pt.config))
    for name in names:
        votes: dict[str, tuple[int, float, dict[str, Any]]] = {}
        for pt in g.points:
            c = pt.config.get(name)
            if not c:
                continue
            work = float(features(point_problem(g.key, pt), sm_count)[1])
            key = flow(dict(c))
            n, w, _ = votes.get(key, (0, 0.0, c))
            votes[key] = (n + 1, max(w, work), dict(c))
        if votes:
            out[name] = max(votes.values(), key=lambda v: (v[0], v[1]))[2]
    return out


def groups_of(results: Sequence[BucketResult], sm_count: int, *, measured: bool = True) -> list[Group]:
    """The results as the cost model's groups, in the order their first point was measured; a
    result where nothing passed is left out. Measured groups are fitted."""
    groups: dict[GroupKey, Group] = {}
    for r in results:
        if not r.ranking():
            continue
        key = r.shape.group
        g = groups.setdefault(key, Group(key, []))
        g.points.append(r.point(measured))
    out = sorted(groups.values(), key=lambda g: _group_order(g.key))
    for g in out:
        if measured:
            g.config = _group_config(g, sm_count)
            g.refit(sm_count)
    return out


def _group_order(k: GroupKey) -> tuple[Any, ...]:
    """Groups in the file: by pass, class, variant, dtype, head dim."""
    return (MODEL_PASSES.index(k.pass_), ALL_CLASSES.index(k.cls), VARIANTS.index(k.variant), k.dtype, k.head_dim)


def _rejections(results: Sequence[BucketResult]) -> list[str]:
    """Header lines: what failed the check or raised (per implementation, how often, one example)
    and the shapes where nothing passed."""
    by_name: dict[str, list[tuple[Shape, str]]] = {}
    lines = []
    for r in results:
        for n, why in r.rejected().items():
            by_name.setdefault(n, []).append((r.shape, why))
        if not r.ranking():
            lines.append(f"  nothing passed at {r.shape.describe()}")
    for n, items in by_name.items():
        s, why = items[0]
        lines.append(f"  {n}: rejected at {len(items)} shape(s), e.g. {s.describe()}: {why[:160]}")
    if lines:
        lines.insert(0, "Rejected (failed the float64 check or raised; never timed, never ranked):")
    return lines


def profile_yaml(results: Sequence[BucketResult], meta: ProfileMeta, *, note: str = "") -> str:
    """The schema-2 profile of `results` (through profile_store.profile_yaml_text)."""
    sm_count = meta.sm_count if meta.sm_count > 0 else _table_sm_count(meta.key)
    groups = groups_of(results, sm_count, measured=meta.measured)
    gen = {"date": meta.date, "tool": meta.tool, "card": meta.card, "command": meta.command, **meta.versions}
    if meta.timing:
        gen["timing"] = meta.timing
    header = meta.header or (MEASURED_HEADER if meta.measured else UNMEASURED_HEADER).format(
        card=meta.card, key=meta.key, tool=meta.tool, date=meta.date, command=meta.command)
    if meta.measured:
        rej = _rejections(results)
        if rej:
            header += "\n\n" + "\n".join(rej)
    device = {"key": meta.key, "name": meta.name, "arch": meta.arch, "sm_count": sm_count}
    prof = Profile("<writing>", meta.key, meta.measured, device, gen, groups, note)
    return profile_yaml_text(prof, header)


def summary(prof: Profile) -> str:
    """A short table of a measured profile: per group, its points and the fastest implementation
    at each, and each model's rate (TFLOP/s, or TB/s where the bytes term carries it) and fit error."""
    lines = [f"{'group':34s} {'pts':>3s}  fastest per point; models (rate, fit error)"]
    for g in prof.groups:
        wins = [min(pt.ms, key=pt.ms.get) for pt in g.points if pt.ms]
        counts = {n: wins.count(n) for n in dict.fromkeys(wins)}
        models = []
        for n, f in sorted(g.fits.items(), key=lambda kv: kv[0]):
            _, per_gflop, per_gb, _ = f.coef
            rate = f"{1e3 / per_gflop:.0f} TF/s" if per_gflop > 0 else f"{1e3 / per_gb:.2f} TB/s" if per_gb > 0 else "-"
            models.append(f"{n} {rate} {f.rms:.0%}")
        lines.append(f"{g.key.label():34s} {len(g.points):3d}  "
                     + ", ".join(f"{n} x{c}" for n, c in counts.items()) + "; " + ", ".join(models))
    return "\n".join(lines)


def _table_sm_count(key: str) -> int:
    try:
        return simulated_device(key).sm_count or 1
    except (KeyError, ValueError):
        return 1


def unmeasured_profile(key: str, header: str, rank: Callable[[Shape], Sequence[str]], plan: Sequence[Shape],
                       command: str) -> str:
    """A profile for a device we cannot measure: at each shape of `plan`, the order `rank(shape)`
    argues, keeping the implementations that can serve the shape on the (simulated) device; no
    times and no configs (the dispatcher then runs each backend's default config for the problem,
    which tools/aot_triton.py compiles for every architecture)."""
    dev = simulated_device(key)
    impls = REGISTRY.all()
    results = []
    for s in plan:
        p = s.problem(dev.kind)
        trials = []
        for i, name in enumerate(rank(s)):
            impl = impls.get(name)
            if impl is None or impl.not_supported_reasons(p, dev):
                continue
            trials.append(Trial(name, {}, "ok", float(i + 1)))  # ms: the order only, not written
        results.append(BucketResult(bucket_id(s), s, bucket_match(s), trials))
    meta = ProfileMeta(key=key, name=dev.name, arch=dev.arch, card=f"{dev.name} (not measured)", command=command,
                       measured=False, header=header, versions={}, tool="flashdispatch.tools.figures",
                       sm_count=dev.sm_count)
    return profile_yaml(results, meta)


CONVERTED_HEADER = """\
flashdispatch profile for {card} ({key}): the measurement of {date} by `{tool}`, converted from
schema 1 to schema 2 on {today} (not re-measured; re-measure with `flashdispatch tune`).
command of the measurement: {command}

Schema 1 held one entry per bucket, each the times of every implementation at one shape; here
each entry is one point of the group its shape falls in, and each group's models are fitted
to those points (few points per group: the models say little between and beyond them, and
`flashdispatch explain` says when a prediction extrapolates or borrows another group's model).
Unlike a tune of today, its decode points are eager medians with the L2 flushed (generated.timing),
not CUDA-graph replays, and carry no host_us."""


def header_of(text: str) -> str:
    """A profile file's comment lines, without their '# ' (what profile_yaml_text writes back)."""
    return "\n".join(line[2:] if line.startswith("# ") else line[1:] for line in text.splitlines()
                     if line.startswith("#"))


def convert_profile(text: str, path: str, *, today: str | None = None) -> str:
    """A profile of any schema the store reads (schema 1 included) rewritten as schema 2, keeping
    its measurements and provenance; the header says it was converted, not re-measured."""
    from flashdispatch.profile_store import parse_profile

    prof = parse_profile(text, path)
    g = prof.generated
    if prof.measured:
        header = CONVERTED_HEADER.format(card=g.get("card", "?"), key=prof.key, date=g.get("date", "?"),
                                         tool=g.get("tool", "?"), command=g.get("command", "?"),
                                         today=today or _dt.date.today().isoformat())
        header += "\n\n" + MEASURED_HEADER.split("\n\n", 1)[1]
        if prof.schema != 2:
            prof.generated = {**g, "converted": f"from schema {prof.schema} on {today or _dt.date.today().isoformat()}"}
    else:
        header = header_of(text)
    prof.device.setdefault("sm_count", prof.sm_count)
    return profile_yaml_text(prof, header)


def refit_profile(text: str, path: str) -> str:
    """A schema-2 profile with every group's models fitted again to its points (after a change of
    the fit), its header, points and configs unchanged."""
    from flashdispatch.profile_store import parse_profile

    prof = parse_profile(text, path)
    if prof.schema != 2:
        raise ValueError(f"{path}: schema {prof.schema}; convert it first (without --refit)")
    if prof.measured:
        for g in prof.groups:
            g.refit(prof.sm_count)
    header = header_of(text)
    return profile_yaml_text(prof, header)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m flashdispatch.tools.profile_writer",
                                 description="Rewrite a profile (schema 1 included) as schema 2, keeping its "
                                             "measurements; prints the new file.")
    ap.add_argument("path", help="the profile to convert")
    ap.add_argument("--refit", action="store_true",
                    help="a schema-2 file: fit every group's models again to its points (after a change of the fit)")
    args = ap.parse_args(argv)
    with open(args.path, encoding="utf-8") as f:
        text = f.read()
    sys.stdout.write(refit_profile(text, args.path) if args.refit else convert_profile(text, args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
