"""Tuning profiles: load, validate, look up.

A profile is `profiles/<device key>.yaml` (schema in docs/design.md). Files are parsed with
`yaml.safe_load` semantics; an invalid file is logged with its path, line and reason and ignored:
selection then falls back to the built-in default order. A user directory
(FLASHDISPATCH_PROFILE_DIR) wins over the shipped files.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .problem import DTYPES_BY_NAME, Problem

log = logging.getLogger("flashdispatch")

SCHEMA_VERSION = 1
PASSES: tuple[str, ...] = ("fwd", "fwd_bwd", "decode")
MATCH_KEYS_REQUIRED: tuple[str, ...] = ("dtype", "head_dim", "causal", "gqa", "pass", "seqlen")
# batch: decode entries only, where split-KV pays off or not depending on how many sequences
# fill the GPU (tools/tune.py writes it for the decode pass).
MATCH_KEYS_OPTIONAL: tuple[str, ...] = ("seqlen_q", "batch")


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


# A causal problem whose cache holds at least this many times its query rows is a "long cache"
# problem (chunked prefill, speculative verification): nearly every row sees nearly every key, a
# different workload from square causal attention, where half the score matrix is masked.
LONG_CACHE_RATIO = 4


def problem_pass(p: Problem) -> str:
    """The profile class of a problem: "fwd_bwd" (training), "decode" (a few query rows that see
    the whole cache: no mask hides anything), else "fwd". A few rows under a bottom-right causal
    mask (speculative verification) are "fwd": the mask is what the decode entries (Sq = 1) never
    measured, and what the causal entries with Sq < Sk did."""
    if p.needs_grad:
        return "fwd_bwd"
    return "decode" if p.is_decode and not p.effective_causal else "fwd"


def _long_cache(causal: bool, seqlen_q: int, seqlen_k: int) -> bool:
    return causal and seqlen_k >= LONG_CACHE_RATIO * seqlen_q


@dataclass(frozen=True)
class Entry:
    index: int
    line: int | None
    match: dict[str, Any]
    ranking: tuple[str, ...]
    ms: dict[str, float]
    config: dict[str, dict[str, Any]]

    def label(self) -> str:
        m = self.match
        q = f" seqlen_q={m['seqlen_q']}" if "seqlen_q" in m else ""
        q += f" batch={m['batch']}" if "batch" in m else ""
        return (
            f"entries[{self.index}] ({m['pass']} {m['dtype']} D={m['head_dim']} "
            f"causal={m['causal']} gqa={m['gqa']} seqlen={m['seqlen']}{q})"
        )


@dataclass
class Profile:
    path: str
    key: str
    measured: bool
    device: dict[str, Any]
    generated: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    note: str = ""

    def provenance(self) -> str:
        g = self.generated
        how = "measured" if self.measured else "NOT measured (rankings argued in the file's header)"
        card = g.get("card") or self.device.get("name", "?")
        return f"{self.path}: {how} on {card}, {g.get('date', '?')}, by {g.get('tool', '?')}"

    def _groups(self) -> dict[tuple[Any, ...], list[Entry]]:
        """Entries by the keys lookup() matches exactly, in file order (kept while `entries` is
        unchanged): a decode loop with a growing KV cache looks up on every step."""
        cached = self.__dict__.get("_groups_cache")
        if cached is not None and cached[0] == len(self.entries):
            return cached[1]
        groups: dict[tuple[Any, ...], list[Entry]] = {}
        for e in self.entries:
            m = e.match
            groups.setdefault((m["dtype"], m["head_dim"], bool(m["causal"]), m["pass"]), []).append(e)
        self.__dict__["_groups_cache"] = (len(self.entries), groups)
        return groups

    def lookup(self, p: Problem) -> Entry | None:
        """Same dtype, head_dim, causal and pass; then nearest gqa, then nearest seqlen (log)."""
        cands = self._groups().get((p.dtype_name, p.head_dim, p.effective_causal, problem_pass(p)))
        if not cands:
            return None
        if p.effective_causal:
            # long-cache causal problems are measured by long-cache entries where the profile has
            # some (nearest gqa and length among them), and square ones by square entries
            mine = _long_cache(True, p.seqlen_q, p.seqlen_k)
            same = [e for e in cands
                    if _long_cache(True, e.match.get("seqlen_q", e.match["seqlen"]), e.match["seqlen"]) == mine]
            cands = same or cands

        def distance(e: Entry) -> tuple[float, float]:
            g = abs(math.log2(e.match["gqa"]) - math.log2(max(1, p.gqa_ratio)))
            sk = abs(math.log2(e.match["seqlen"]) - math.log2(max(1, p.seqlen_k)))
            sq = abs(math.log2(e.match.get("seqlen_q", e.match["seqlen"])) - math.log2(max(1, p.seqlen_q)))
            if "batch" in e.match:
                sq += abs(math.log2(e.match["batch"]) - math.log2(max(1, p.batch)))
            return (g, sk + sq)

        return min(cands, key=distance)


def _need(cond: bool, path: str, line: int | None, reason: str) -> None:
    if not cond:
        raise ProfileError(path, line, reason)


def parse_profile(text: str, path: str) -> Profile:
    """Parse and validate; raises ProfileError naming the path, line and reason."""
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ProfileError(path, mark.line + 1 if mark else None, f"YAML syntax: {e}") from None
    _need(isinstance(raw, dict), path, None, "top level must be a mapping")
    top = raw.get("__line__")
    _need(raw.get("schema") == SCHEMA_VERSION, path, top, f"schema must be {SCHEMA_VERSION}, got {raw.get('schema')!r}")
    dev = raw.get("device")
    _need(isinstance(dev, dict) and isinstance(dev.get("key"), str), path, top, "device.key is required")
    _need(isinstance(raw.get("measured"), bool), path, top, "measured: true|false is required")
    gen = raw.get("generated") or {}
    _need(isinstance(gen, dict), path, top, "generated must be a mapping")
    if raw["measured"]:
        _need(bool(gen.get("card")) and bool(gen.get("date")), path, gen.get("__line__", top),
              "a measured profile must name generated.card and generated.date")
    entries_raw = raw.get("entries") or []
    _need(isinstance(entries_raw, list), path, top, "entries must be a list")
    entries: list[Entry] = []
    for i, e in enumerate(entries_raw):
        line = e.get("__line__") if isinstance(e, dict) else None
        _need(isinstance(e, dict), path, line, f"entries[{i}] must be a mapping")
        m = e.get("match")
        _need(isinstance(m, dict), path, line, f"entries[{i}].match is required")
        missing = [k for k in MATCH_KEYS_REQUIRED if k not in m]
        _need(not missing, path, m.get("__line__", line), f"entries[{i}].match lacks {missing}")
        unknown = [k for k in m if k not in MATCH_KEYS_REQUIRED + MATCH_KEYS_OPTIONAL + ("__line__",)]
        _need(not unknown, path, m.get("__line__", line), f"entries[{i}].match has unknown keys {unknown}")
        _need(m["dtype"] in DTYPES_BY_NAME, path, m.get("__line__", line),
              f"entries[{i}].match.dtype must be one of {sorted(DTYPES_BY_NAME)}, got {m['dtype']!r}")
        _need(m["pass"] in PASSES, path, m.get("__line__", line),
              f"entries[{i}].match.pass must be one of {PASSES}, got {m['pass']!r}")
        for k in ("head_dim", "gqa", "seqlen", "seqlen_q", "batch"):
            if k in m:
                _need(isinstance(m[k], int) and m[k] > 0, path, m.get("__line__", line),
                      f"entries[{i}].match.{k} must be a positive int, got {m[k]!r}")
        ranking = e.get("ranking")
        _need(isinstance(ranking, list) and ranking and all(isinstance(r, str) for r in ranking),
              path, line, f"entries[{i}].ranking must be a non-empty list of backend names")
        ms = e.get("ms") or {}
        _need(isinstance(ms, dict), path, line, f"entries[{i}].ms must be a mapping")
        cfg = e.get("config") or {}
        _need(isinstance(cfg, dict) and all(isinstance(v, dict) for k, v in cfg.items() if k != "__line__"),
              path, line, f"entries[{i}].config must map backend names to mappings")
        entries.append(Entry(i, line, _strip(m), tuple(ranking), {k: float(v) for k, v in _strip(ms).items()}, _strip(cfg)))
    return Profile(path, dev["key"], raw["measured"], _strip(dev), _strip(gen), entries, str(raw.get("note", "")))


def _shipped_text(key: str) -> tuple[str, str] | None:
    try:
        res = resources.files("flashdispatch.profiles").joinpath(f"{key}.yaml")
        if res.is_file():
            return res.read_text(encoding="utf-8"), str(res)
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return None


def load_profile(key: str | None, user_dir: str = "") -> tuple[Profile | None, list[str]]:
    """The profile for a device key (user directory first) and the problems met on the way."""
    problems: list[str] = []
    if key is None:
        return None, problems
    sources: list[tuple[str, str]] = []
    if user_dir and not os.path.isdir(user_dir):
        why = (f"FLASHDISPATCH_PROFILE_DIR={user_dir!r} is not a directory (no such directory, or a file): "
               "only the shipped profiles are used")
        log.warning("%s", why)
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
            log.warning("%s; ignoring it", why)
            problems.append(why)
    return None, problems
