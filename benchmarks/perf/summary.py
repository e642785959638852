"""Collect the headline numbers of every benchmark result into ``summary.json`` and ``summary.md``.

::

    python -m benchmarks.perf.summary [--out DIR]

Reads ``<DIR>/{generation,roof,scoring,scaling,e2e,memory,training,training-precision,startup}.json`` (any that exist) and writes
``<DIR>/summary.json``: the headline keys (``ratio_vs_reference``, ``pipeline_fraction_of_engine``,
``teacher_roof_fraction``, ``scaling_efficiency_8``, ``scoring_fraction_of_loop``, ``peak_rss_gb``,
``e2e_ray_over_local``, ``e2e_speedup_vs_authors_loop``, ``train_fixed_cost_ray_s`` and the others each benchmark reports),
where each came from, and how each compares with the issue's target (met or not, and by how much
it falls short).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.perf.common import RESULTS_DIR, fmt, log, markdown_table, read_result

SOURCES = ("generation", "roof", "scoring", "scaling", "e2e", "memory", "training", "training-precision", "startup")

TARGETS: dict[str, tuple[str, float]] = {
    "ratio_vs_reference": (">=", 15.0),
    "pipeline_fraction_of_engine": (">=", 0.9),
    "teacher_roof_fraction": (">=", 0.25),
    "scaling_efficiency_8": (">=", 0.9),
    "scoring_fraction_of_loop": (">=", 0.9),
    "e2e_ray_over_local": ("<=", 1.15),
    "e2e_speedup_vs_authors_loop": (">=", 5.0),
    "train_fixed_cost_ray_s": ("<=", 5.0),
}
"""The targets of the performance issue, on the 2-core CPU machine with the embedded teacher."""

REQUIRED = ("ratio_vs_reference", "pipeline_fraction_of_engine", "teacher_roof_fraction", "scaling_efficiency_8",
            "scoring_fraction_of_loop", "peak_rss_gb", "e2e_ray_over_local", "e2e_speedup_vs_authors_loop",
            "train_fixed_cost_ray_s")
"""Keys summary.json always has (null where the benchmark has not been run)."""


def compare_target(value: float | None, op: str, target: float) -> dict[str, Any]:
    """Whether ``value`` meets ``op target``, and its shortfall as a share of the target.

    Returns:
        ``{"target", "op", "value", "met", "shortfall"}``; ``met`` is None without a value;
        ``shortfall`` is 0 when met, else how far the value is from the target as a share of it:
        ``1 - value / target`` for a missed ``>=`` target, ``value / target - 1`` for a missed
        ``<=`` target (a ceiling, such as a slowdown ratio).

    Raises:
        ValueError: ``op`` is neither ``>=`` nor ``<=``.
    """
    if op not in (">=", "<="):
        raise ValueError(f"unsupported target operator {op!r}")
    if value is None:
        return {"target": target, "op": op, "value": None, "met": None, "shortfall": None}
    met = value >= target if op == ">=" else value <= target
    missed_by = 1 - value / target if op == ">=" else value / target - 1
    shortfall = 0.0 if met else missed_by
    return {"target": target, "op": op, "value": value, "met": met, "shortfall": shortfall}


def build_summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary of the given results (by benchmark name).

    Returns:
        The headline keys at the top level (every :data:`REQUIRED` key present), plus
        ``sources`` (file, created time, machine and command per benchmark) and ``targets``.
    """
    summary: dict[str, Any] = {key: None for key in REQUIRED}
    sources: dict[str, Any] = {}
    for name, res in results.items():
        for key, value in res["headline"].items():
            summary[key] = value
        m = res["machine"]
        sources[name] = {"created": res["created"], "command": res["command"],
                         "machine": f"{m.get('cpu_model')}, {m.get('logical_cpus')} CPUs"
                                    + (f", {m['gpu']}" if m.get("gpu") else ""),
                         "quick": bool(res["params"].get("quick")), "keys": sorted(res["headline"])}
    summary["sources"] = sources
    summary["targets"] = {key: compare_target(summary.get(key), op, t) for key, (op, t) in TARGETS.items()}
    return summary


def main(argv: list[str] | None = None) -> int:
    """Write ``summary.json`` and ``summary.md`` from the results in ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(RESULTS_DIR), help="results folder (read and written)")
    args = p.parse_args(argv)
    out = Path(args.out)
    results = {name: read_result(out / f"{name}.json") for name in SOURCES if (out / f"{name}.json").is_file()}
    if not results:
        p.error(f"{out}: no benchmark results ({', '.join(s + '.json' for s in SOURCES)})")
    summary = build_summary(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    keys = [k for k in summary if k not in ("sources", "targets")]
    rows = []
    for key in keys:
        t = summary["targets"].get(key)
        target = f"{t['op']} {fmt(t['target'])}" if t else ""
        met = "" if not t or t["met"] is None else ("yes" if t["met"] else
                                                     f"no ({t['shortfall']:.0%} {'short' if t['op'] == '>=' else 'over'})")
        rows.append([key, summary[key], target, met])
    quick = [n for n, s in summary["sources"].items() if s["quick"]]
    lines = ["# Performance summary", "",
             markdown_table(["key", "value", "target", "met"], rows), "",
             "Sources: " + "; ".join(f"{n} ({s['created']}, {s['machine']})" for n, s in summary["sources"].items())
             + "."]
    if quick:
        lines += ["", f"Smoke-test sizes (--quick), numbers mean nothing: {', '.join(quick)}."]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(f"summary: wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
