"""A measured bench or held-out run re-scored under the current selection rules, offline.

Every provider of a bench row was timed on the card (plain SDPA, each eligible implementation and
the dispatcher), so the time of whatever today's selection rules would choose for that row is in
the file already: where `select()` now picks another implementation on the same (simulated) card,
the dispatcher's column becomes that implementation's measurement (an unchanged choice keeps the
dispatcher's own), and the ratios and summaries are recomputed. This
is how a change to the cost model or its rules is checked on a CPU against real GPU times:

    flashdispatch bench --rescore docs/bench-h200/2026-12-05/heldout.json --out /tmp/rescored

The result says it is a re-score and is never judged against the bars: a measurement is. The
choice is made among the implementations this machine has: one that cannot be imported here (the
CuPy backend without CuPy) is not chosen, as on a card without it.
Rows the rules cannot be replayed for keep their measured dispatcher: serving calls (varlen /
KV-cache, chosen by the serving families) and rows whose new choice was not timed (then the row
says so and is left out of the ratios).
"""

from __future__ import annotations

import copy
import datetime as _dt
import re
from typing import Any

from flashdispatch.device import simulated_device
from flashdispatch.registry import REGISTRY
from flashdispatch.selection import profile_for, select

from . import bench_report
from .bench_report import DISPATCH, PLAIN
from .shapes import Shape

RESCORED_NOTE = ("re-scored offline under the current selection rules from the measurements below; "
                 "not a measurement, not judged against the bars")


def card_key(result: dict[str, Any]) -> str:
    """The profile key of the card a result was measured on ("profile=h200" in its device line)."""
    m = re.search(r"profile=(\S+)", str(result.get("meta", {}).get("device", "")))
    if not m or m.group(1) in ("none", "None"):
        raise ValueError("--rescore: the result's meta.device names no profile key (profile=...); "
                         "it was not measured on a card with a profile")
    return m.group(1)


def _provider_of(name: str, providers: dict[str, Any]) -> dict[str, Any] | None:
    """The measurement of implementation `name` in a row, whatever its status (a provider that
    failed its float64 check or raised stays so); plain `sdpa` falls back to torch's own call
    only when the row has no `sdpa` of ours. None: not in the row."""
    if name in providers:
        return providers[name]
    if name == "sdpa" and PLAIN in providers:
        return providers[PLAIN]
    return None


def rescore(result: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """A copy of `result` whose dispatcher column is what select() now picks on card `key` (default:
    the card it was measured on), with ratios and summary recomputed and meta saying so."""
    key = key or card_key(result)
    dev = simulated_device(key)
    rows, moved, untimed, failed = [], [], [], []
    for row in result.get("rows", []):
        new = copy.deepcopy(row)
        shape = Shape(**row["shape"])
        if shape.serving:
            rows.append(new)
            continue
        d = select(shape.problem(), backend="auto", device=dev)  # FLASHDISPATCH_BACKEND does not apply
        was = row.get("choice", {}).get("variant")
        if d.variant != was:  # an unchanged choice keeps the dispatcher's own measured time and config
            moved.append(f"{row['label']}: {was} -> {d.variant}")
            # the time is the provider's as the run timed it (its config then, not today's)
            new["choice"] = {"variant": d.variant, "config": None, "source": d.source, "measured_choice": was}
            m = _provider_of(d.variant, row["providers"])
            if m is None:
                new["providers"][DISPATCH] = {"status": "missing", "note": f"{d.variant} was not timed in this run"}
                untimed.append(row["label"])
            else:
                new["providers"][DISPATCH] = copy.deepcopy(m)
                if m.get("status") != "ok":
                    failed.append(f"{row['label']}: {d.variant} ({m.get('status')})")
        bench_report.add_ratios(new)
        rows.append(new)
    meta = copy.deepcopy(result.get("meta", {}))
    prof = profile_for(dev)[0]
    meta["rescored"] = {"date": _dt.date.today().isoformat(), "card": key, "note": RESCORED_NOTE,
                        "profile": prof.path if prof is not None else None,
                        "unavailable_here": sorted(n for n in REGISTRY.all() if REGISTRY.availability(n)),
                        "moved": moved, "untimed": untimed, "failed": failed}
    meta["command"] = f"flashdispatch bench --rescore (of: {meta.get('command', 'a measured run')})"
    meta["timing"] = f"{RESCORED_NOTE}: {meta.get('timing', '')}"
    planned = meta.get("planned")
    # every shape counts, as on the card (judge=True), but no bar is checked: this is not a measurement
    summary = (bench_report.heldout_summary(rows, judge=True, planned=planned) if bench_report.is_heldout(result)
               else bench_report.summarize(rows, judge=True, planned=planned))
    summary["checks"] = {}
    summary["rescored"] = meta["rescored"]
    return {"meta": meta, "rows": rows, "summary": summary}
