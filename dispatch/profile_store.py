"""Tuning profiles: load, validate, write.

A profile is `profiles/<device key>.yaml` (schema in docs/profiles.md): per group of problems
(pass x shape class x variant x dtype x head dim, dispatch/costmodel.py) the shapes measured with
every implementation's time, and the model fitted to them. Files are parsed with
`yaml.safe_load` semantics; an invalid file is logged with its path, line and reason and ignored:
selection then falls back to the built-in default order. A user directory
(FLASHDISPATCH_PROFILE_DIR) wins over the shipped files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

import yaml

from .costmodel import (
    ALL_CLASSES, MODEL_PASSES, VARIANTS, CostModel, Fit, Group, GroupKey, Point, group_key, point_class,
)
from .device import DEVICE_TABLE
from .problem import DTYPES_BY_NAME, Problem, problem_from_shape

log = logging.getLogger("flashdispatch")

SCHEMA_VERSION = 2
# Schema 1 (a table of buckets, each a ranking and the times at one shape) still loads: its
# entries become the points of schema 2's groups, and the models are fitted when the file loads.
OLD_SCHEMAS: tuple[int, ...] = (1,)
# How a benchmark or tune shape is timed (tools/shapes.py): "decode" (few rows against a cache, no
# mask) is timed as serving runs it, a CUDA-graph replay; the model's groups key on the pass
# (fwd / fwd_bwd) and the shape class instead.
TIMING_PASSES: tuple[str, ...] = ("fwd", "fwd_bwd", "decode")


def timing_pass(p: Problem) -> str:
    """How a problem is timed: "fwd_bwd" (training), "decode" (a few query rows that see the whole
    cache), else "fwd"."""
    if p.needs_grad:
        return "fwd_bwd"
    return "decode" if p.is_decode and not p.effective_causal else "fwd"


GROUP_KEYS: tuple[str, ...] = ("pass", "class", "variant", "dtype", "head_dim")
POINT_DIMS: tuple[str, ...] = ("B", "Hq", "Hkv", "Sq", "Sk")


class ProfileError(ValueError):
    def __init__(self, path: str, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"invalid profile {where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping (for error messages)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "__line__"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def sm_count_of(device: dict[str, Any]) -> int:
    """The SM (CU) count the models of a profile were fitted with: the file's device.sm_count,
    else the device table's, else 1 (a CPU: no wave quantisation)."""
    n = device.get("sm_count")
    if isinstance(n, int) and n > 0:
        return n
    for d in DEVICE_TABLE:
        if d.key == device.get("key"):
            return max(1, d.sm_count)
    return 1


@dataclass
class Profile:
    path: str
    key: str
    measured: bool
    device: dict[str, Any]
    generated: dict[str, Any]
    groups: list[Group] = field(default_factory=list)
    note: str = ""
    schema: int = SCHEMA_VERSION  # the schema the file was written in (1: converted on load)
    # autotune's overlay merged into this profile (dispatch/autotune.Overlay), if any
    overlay: Any = field(default=None, repr=False, compare=False)

    def provenance(self) -> str:
        g = self.generated
        how = "measured" if self.measured else "NOT measured (rankings argued in the file's header)"
        card = g.get("card") or self.device.get("name", "?")
        old = f" (schema {self.schema}, converted on load)" if self.schema != SCHEMA_VERSION else ""
        return f"{self.path}: {how} on {card}, {g.get('date', '?')}, by {g.get('tool', '?')}{old}"

    @property
    def sm_count(self) -> int:
        return sm_count_of(self.device)

    def _index(self, name: str, measured: bool) -> CostModel:
        """A CostModel over the groups with fits (measured) or with argued rankings, built once and
        again when groups are added or models_changed() is called."""
        cached = self.__dict__.get(name)
        if cached is None or cached[0] != len(self.groups):
            groups = [g for g in self.groups if (g.fits if measured else any(pt.ranking for pt in g.points))]
            cached = (len(self.groups), CostModel(groups, self.sm_count))
            self.__dict__[name] = cached
        return cached[1]

    @property
    def model(self) -> CostModel:
        """The cost model of the measured groups."""
        return self._index("_model", True)

    def models_changed(self) -> None:
        """Groups were refitted or given points: the indexes are built again on next use."""
        self.__dict__.pop("_model", None)
        self.__dict__.pop("_argued", None)

    def group(self, key: GroupKey) -> Group | None:
        for g in self.groups:
            if g.key == key:
                return g
        return None

    def argued_ranking(self, p: Problem) -> tuple[tuple[str, ...], Group, Point, tuple[str, ...]] | None:
        """An unmeasured profile's order for `p`: the ranking of the nearest point of the nearest
        group (CostModel's borrowing rules; a variant takes the plain problem's), with the
        borrowing in words."""
        index = self._index("_argued", False)
        if not index:
            return None
        key = group_key(p)
        keys = list(index.candidates(key))
        if key.variant != "plain":
            keys += list(index.candidates(key._replace(variant="plain")))
        for gk, why in keys:
            g = index.groups.get(gk)
            if g is None:
                continue
            pt = g.nearest_points(p, "", self.sm_count, 1, has="ranking")[0]
            return pt.ranking, g, pt, why
        return None


def _need(cond: bool, path: str, line: int | None, reason: str) -> None:
    if not cond:
        raise ProfileError(path, line, reason)


def _keys(m: dict[str, Any], required: Sequence[str], optional: Sequence[str], what: str, path: str,
          line: int | None) -> None:
    """A mapping has every required key and no key outside required + optional."""
    missing = [k for k in required if k not in m]
    _need(not missing, path, line, f"{what} lacks {missing}")
    unknown = [k for k in m if k not in (*required, *optional, "__line__")]
    _need(not unknown, path, line, f"{what} has unknown keys {unknown}")


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _times(d: Any, path: str, line: int | None, what: str) -> dict[str, float]:
    _need(isinstance(d, dict), path, line, f"{what} must map implementation names to numbers")
    out = {}
    for k, v in _strip(d).items():
        _need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
              path, line, f"{what}.{k} must be a positive number, got {v!r}")
        out[str(k)] = float(v)
    return out


def _parse_group(i: int, g: Any, path: str, measured: bool) -> Group:
    line = g.get("__line__") if isinstance(g, dict) else None
    _need(isinstance(g, dict), path, line, f"groups[{i}] must be a mapping")
    k = g.get("key")
    _need(isinstance(k, dict), path, line, f"groups[{i}].key is required")
    kl = k.get("__line__", line)
    _keys(k, GROUP_KEYS, (), f"groups[{i}].key", path, kl)
    _need(k["pass"] in MODEL_PASSES, path, kl,
          f"groups[{i}].key.pass must be one of {MODEL_PASSES}, got {k['pass']!r}")
    _need(k["class"] in ALL_CLASSES, path, kl,
          f"groups[{i}].key.class must be one of {ALL_CLASSES}, got {k['class']!r}")
    _need(k["variant"] in VARIANTS, path, kl, f"groups[{i}].key.variant must be one of {VARIANTS}, got {k['variant']!r}")
    _need(k["dtype"] in DTYPES_BY_NAME, path, kl,
          f"groups[{i}].key.dtype must be one of {sorted(DTYPES_BY_NAME)}, got {k['dtype']!r}")
    _need(_positive_int(k["head_dim"]), path, kl, f"groups[{i}].key.head_dim must be a positive int, got {k['head_dim']!r}")
    key = GroupKey(k["pass"], k["class"], k["variant"], k["dtype"], k["head_dim"])
    pts_raw = g.get("points")
    _need(isinstance(pts_raw, list) and pts_raw, path, line, f"groups[{i}].points must be a non-empty list")
    points = []
    for j, pt in enumerate(pts_raw):
        pl = pt.get("__line__", line) if isinstance(pt, dict) else line
        what = f"groups[{i}].points[{j}]"
        _need(isinstance(pt, dict), path, pl, f"{what} must be a mapping")
        for d in POINT_DIMS:
            _need(_positive_int(pt.get(d)), path, pl, f"{what}.{d} must be a positive int, got {pt.get(d)!r}")
        _need(pt["Hq"] % pt["Hkv"] == 0, path, pl, f"{what}: Hq={pt['Hq']} must be a multiple of Hkv={pt['Hkv']}")
        window = pt.get("window", -1)
        _need(isinstance(window, int) and window >= -1, path, pl, f"{what}.window must be an int >= -1, got {window!r}")
        ms = _times(pt.get("ms") or {}, path, pl, f"{what}.ms")
        host = _times(pt.get("host_us") or {}, path, pl, f"{what}.host_us")
        ranking = pt.get("ranking") or []
        _need(isinstance(ranking, list) and all(isinstance(r, str) for r in ranking), path, pl,
              f"{what}.ranking must be a list of implementation names")
        if measured:
            _need(bool(ms), path, pl, f"{what}: a measured profile's point needs ms")
        else:
            _need(bool(ranking) and not ms, path, pl, f"{what}: an unmeasured profile's point has a ranking and no ms")
        pcfg = pt.get("config") or {}
        _need(isinstance(pcfg, dict) and all(isinstance(v, dict) for kk, v in pcfg.items() if kk != "__line__"),
              path, pl, f"{what}.config must map implementation names to mappings")
        point = Point(pt["B"], pt["Hq"], pt["Hkv"], pt["Sq"], pt["Sk"], window, ms, host, tuple(ranking),
                      _strip(pcfg))
        cls = point_class(key, point)
        _need(cls == key.cls, path, pl, f"{what}: Sq={pt['Sq']}, Sk={pt['Sk']} is class {cls!r}, not the group's {key.cls!r}")
        points.append(point)
    fits: dict[str, Fit] = {}
    fits_raw = g.get("fits") or {}
    _need(isinstance(fits_raw, dict), path, line, f"groups[{i}].fits must map implementation names to fits")
    for name, f in _strip(fits_raw).items():
        try:
            fits[str(name)] = Fit.from_yaml(f)
        except (TypeError, ValueError) as e:
            raise ProfileError(path, fits_raw.get("__line__", line), f"groups[{i}].fits.{name}: {e}") from None
        fit_ = fits[str(name)]
        if measured and fit_.excluded:  # indices into the implementation's own points
            own = sum(1 for pt in points if str(name) in pt.ms)
            _need(fit_.n + len(fit_.excluded) == own and max(fit_.excluded) < own, path,
                  fits_raw.get("__line__", line),
                  f"groups[{i}].fits.{name}: n={fit_.n} and excluded={list(fit_.excluded)} do not match its {own} "
                  f"measured points (a stale fit: refit the file with tools/profile_writer.py --refit)")
    cfg = g.get("config") or {}
    _need(isinstance(cfg, dict) and all(isinstance(v, dict) for kk, v in cfg.items() if kk != "__line__"),
          path, line, f"groups[{i}].config must map implementation names to mappings")
    return Group(key, points, fits, _strip(cfg), line)


def _check_header(raw: Any, path: str) -> None:
    _need(isinstance(raw, dict), path, None, "top level must be a mapping")
    top = raw.get("__line__")
    dev = raw.get("device")
    _need(isinstance(dev, dict) and isinstance(dev.get("key"), str), path, top, "device.key is required")
    _need(isinstance(raw.get("measured"), bool), path, top, "measured: true|false is required")
    gen = raw.get("generated") or {}
    _need(isinstance(gen, dict), path, top, "generated must be a mapping")
    if raw["measured"]:
        _need(bool(gen.get("card")) and bool(gen.get("date")), path, gen.get("__line__", top),
              "a measured profile must name generated.card and generated.date")


def parse_profile(text: str, path: str) -> Profile:
    """Parse and validate (schema 2, or 1 converted); raises ProfileError naming the path, line
    and reason."""
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ProfileError(path, mark.line + 1 if mark else None, f"YAML syntax: {e}") from None
    _need(isinstance(raw, dict), path, None, "top level must be a mapping")
    top = raw.get("__line__")
    schema = raw.get("schema")
    _need(schema == SCHEMA_VERSION or schema in OLD_SCHEMAS, path, top,
          f"schema must be {SCHEMA_VERSION} (or {', '.join(map(str, OLD_SCHEMAS))}, converted on load), "
          f"got {schema!r}; regenerate the file with `flashdispatch tune`")
    _check_header(raw, path)
    measured = raw["measured"]
    dev = _strip(raw["device"])
    if schema == 1:
        groups = _groups_from_schema1(raw, path)
    else:
        groups_raw = raw.get("groups") or []
        _need(isinstance(groups_raw, list), path, top, "groups must be a list")
        groups = [_parse_group(i, g, path, measured) for i, g in enumerate(groups_raw)]
        seen: dict[GroupKey, int] = {}
        for i, g in enumerate(groups):
            _need(g.key not in seen, path, g.line, f"groups[{i}] repeats the key of groups[{seen.get(g.key)}]")
            seen[g.key] = i
    prof = Profile(path, dev["key"], measured, dev, _strip(raw.get("generated") or {}), groups,
                   str(raw.get("note", "")), int(schema))
    if measured:
        for g in prof.groups:  # a group written without fits (by hand, or schema 1) is fitted now
            if not g.fits:
                g.refit(prof.sm_count)
    return prof


# --- schema 1 ------------------------------------------------------------------------------------

_V1_MATCH_REQUIRED: tuple[str, ...] = ("dtype", "head_dim", "causal", "gqa", "pass", "seqlen")
_V1_MATCH_OPTIONAL: tuple[str, ...] = ("seqlen_q", "batch")


def _groups_from_schema1(raw: dict[str, Any], path: str) -> list[Group]:
    """Schema 1 entries as schema 2 groups: each entry is one point of the group its shape falls in
    (an entry without `shape` stands at B = `batch` or 1, Hq = 32 x gqa / gqa, as a nominal shape)."""
    top = raw.get("__line__")
    entries = raw.get("entries") or []
    _need(isinstance(entries, list), path, top, "entries must be a list")
    groups: dict[GroupKey, Group] = {}
    for i, e in enumerate(entries):
        line = e.get("__line__") if isinstance(e, dict) else None
        _need(isinstance(e, dict), path, line, f"entries[{i}] must be a mapping")
        m = e.get("match")
        _need(isinstance(m, dict), path, line, f"entries[{i}].match is required")
        ml = m.get("__line__", line)
        _keys(m, _V1_MATCH_REQUIRED, _V1_MATCH_OPTIONAL, f"entries[{i}].match", path, ml)
        _need(m["dtype"] in DTYPES_BY_NAME, path, ml,
              f"entries[{i}].match.dtype must be one of {sorted(DTYPES_BY_NAME)}, got {m['dtype']!r}")
        _need(m["pass"] in ("fwd", "fwd_bwd", "decode"), path, ml,
              f"entries[{i}].match.pass must be one of ('fwd', 'fwd_bwd', 'decode'), got {m['pass']!r}")
        for k in ("head_dim", "gqa", "seqlen", "seqlen_q", "batch"):
            if k in m:
                _need(_positive_int(m[k]), path, ml, f"entries[{i}].match.{k} must be a positive int, got {m[k]!r}")
        ranking = e.get("ranking")
        _need(isinstance(ranking, list) and ranking and all(isinstance(r, str) for r in ranking),
              path, line, f"entries[{i}].ranking must be a non-empty list of backend names")
        ms = _times(e.get("ms") or {}, path, line, f"entries[{i}].ms")
        cfg = e.get("config") or {}
        _need(isinstance(cfg, dict) and all(isinstance(v, dict) for k, v in cfg.items() if k != "__line__"),
              path, line, f"entries[{i}].config must map backend names to mappings")
        shape = e.get("shape")
        if isinstance(shape, dict) and all(_positive_int(shape.get(k)) for k in POINT_DIMS):
            dims = tuple(shape[k] for k in POINT_DIMS)
        else:
            g = m["gqa"]
            hq = 32 if 32 % g == 0 else g
            dims = (m.get("batch", 1), hq, hq // g, m.get("seqlen_q", 1 if m["pass"] == "decode" else m["seqlen"]),
                    m["seqlen"])
        p = problem_from_shape(dims + (m["head_dim"],), dtype=m["dtype"], causal=bool(m["causal"]),
                               needs_grad=m["pass"] == "fwd_bwd")
        key = group_key(p)
        pt = Point(*dims, ms=ms if ms else {}, ranking=() if ms else tuple(ranking), config=_strip(cfg))
        grp = groups.setdefault(key, Group(key, [], {}, {}, line))
        grp.points.append(pt)
        for name, c in _strip(cfg).items():
            grp.config.setdefault(name, c)
    return list(groups.values())


# --- writing ---------------------------------------------------------------------------------------


def _scalar(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        mant, e, exp = repr(float(f"{x:.4g}")).partition("e")
        return f"{mant if '.' in mant else mant + '.0'}{e}{exp}"  # YAML 1.1 reads 1e-07 as a string
    if isinstance(x, int):
        return str(x)
    if x is None:
        return "null"
    s = str(x)
    return s if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", s) and s not in ("true", "false", "null", "yes", "no", "on", "off") else json.dumps(s)


def flow(x: Any) -> str:
    """One-line YAML (flow style) of scalars, lists and mappings, keys in their order."""
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {flow(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(flow(v) for v in x) + "]"
    return _scalar(x)


def point_yaml(pt: Point) -> dict[str, Any]:
    d: dict[str, Any] = dict(zip(POINT_DIMS, pt.dims()))
    if pt.window >= 0:
        d["window"] = pt.window
    if pt.ms:
        d["ms"] = dict(pt.ms)
    if pt.host_us:
        d["host_us"] = dict(pt.host_us)
    if pt.ranking:
        d["ranking"] = list(pt.ranking)
    if pt.config:
        d["config"] = {k: dict(v) for k, v in pt.config.items()}
    return d


def groups_yaml(groups: Sequence[Group]) -> list[str]:
    """The `groups:` section, one line per point (diffable: a re-measured point is one changed line)."""
    if not groups:
        return ["groups: []"]
    lines = ["groups:"]
    for g in groups:
        k = g.key
        lines.append("  - key: " + flow({"pass": k.pass_, "class": k.cls, "variant": k.variant,
                                          "dtype": k.dtype, "head_dim": k.head_dim}))
        lines.append("    points:")
        lines += ["      - " + flow(point_yaml(pt)) for pt in g.points]
        if g.fits:
            lines.append("    fits:")
            lines += [f"      {_scalar(n)}: {flow(f.to_yaml())}" for n, f in g.fits.items()]
        if g.config:
            lines.append("    config:")
            lines += [f"      {_scalar(n)}: {flow(c)}" for n, c in g.config.items()]
    return lines


def profile_yaml_text(prof: Profile, header: str = "") -> str:
    """A profile as schema-2 YAML (the tuner's writer and the schema-1 converter both end here)."""
    lines = [f"# {ln}".rstrip() for ln in header.splitlines()] if header else []
    dev = dict(prof.device)
    dev.setdefault("sm_count", prof.sm_count)
    lines += [
        f"schema: {SCHEMA_VERSION}",
        "device: " + flow(dev),
        "generated: " + flow(prof.generated),
        f"measured: {_scalar(prof.measured)}",
    ]
    if prof.note:
        lines.append("note: " + _scalar(prof.note))
    lines += groups_yaml(prof.groups)
    return "\n".join(lines) + "\n"


def _shipped_text(key: str) -> tuple[str, str] | None:
    try:
        res = resources.files("flashdispatch.profiles").joinpath(f"{key}.yaml")
        if res.is_file():
            return res.read_text(encoding="utf-8"), str(res)
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return None


_warned: set[str] = set()  # problems already logged: each is said once per process (explain keeps listing it)


def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        log.warning("%s", why)


def load_profile(key: str | None, user_dir: str = "") -> tuple[Profile | None, list[str]]:
    """The profile for a device key (user directory first) and the problems met on the way."""
    problems: list[str] = []
    if key is None:
        return None, problems
    sources: list[tuple[str, str]] = []
    if user_dir and not os.path.isdir(user_dir):
        why = (f"FLASHDISPATCH_PROFILE_DIR={user_dir!r} is not a directory (no such directory, or a file): "
               "only the shipped profiles are used")
        _warn_once(why)
        problems.append(why)
    elif user_dir:
        path = os.path.join(user_dir, f"{key}.yaml")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                sources.append((f.read(), path))
    shipped = _shipped_text(key)
    if shipped:
        sources.append(shipped)
    for text, path in sources:
        try:
            return parse_profile(text, path), problems
        except Exception as e:  # a malformed file of any kind is ignored, never breaks attention()
            why = str(e) if isinstance(e, ProfileError) else f"{path}: {type(e).__name__}: {e}"
            _warn_once(f"{why}; ignoring it")
            problems.append(why)
    return None, problems
