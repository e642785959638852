"""What the energy band feeds back, against a random band, judged by a student that saw neither run.

Usage::

    python benchmarks/quality/bands.py ENERGY_RUN RANDOM_RUN --judge JUDGE_RUN [--out NAME]

``ENERGY_RUN`` is a GOLD run folder and ``RANDOM_RUN`` its random-band twin, best one forked from
it (``run.py --fork``), so that the two share iteration 0 and differ in the band alone.
``JUDGE_RUN`` is a finished run of the same task with other samples (another seed): its final
student labels every probe and training sample of both runs. Where the judge disagrees with a
sample's label, the sample is hard, ambiguous or mislabelled; the judge errs too,
so only the comparison between the two runs (one judge for both) carries meaning.

Per run and iteration it reports the in-loop student's accuracy on the real set, the judge's
disagreement on the iteration's training samples and on the probes the band picked in that
iteration (``picked``: they join the feedback pool shown in the next prompts), their mean length, and, for the energy run, the disagreement on the probes below,
inside and above the energy band (ranks 0 to ``band_lo``, the band, ``band_hi`` to 1). It writes
``results/bands-<NAME>.json`` and ``.md`` (``NAME`` defaults to the energy run's folder name).

It reads run folders and runs the judge on CPU; nothing is trained or generated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _share(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 3) if flags else None


def run_rows(run_dir: Path, disagrees, band: tuple[float, float] | None, fields: list[str]) -> list[dict]:
    """One row per committed iteration of ``run_dir``; ``band`` splits the probes by energy rank."""
    from gold_ray.run.store import part_path, read_parts
    from gold_ray.strategies.gold import text_chars
    from gold_ray.student.ood import band_indices

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = []
    for it in metrics.get("iterations", []):
        i = it["iteration"]
        train = read_parts([p for p in [part_path(run_dir, "train", i)] if p.is_file()])
        probes = read_parts([p for p in [part_path(run_dir, "probe", i)] if p.is_file()])
        chosen = set((it.get("feedback") or {}).get("ids") or [])
        train_dis = disagrees(train)
        probe_dis = disagrees(probes)
        feedback = [(r, d) for r, d in zip(probes, probe_dis, strict=True) if r["id"] in chosen]
        row = {
            "iteration": i,
            "accuracy": (it.get("train") or {}).get("accuracy"),
            "train_records": len(train),
            "train_disagree": _share(train_dis),
            "train_chars": round(float(np.mean([text_chars(r, fields) for r in train])), 1) if train else None,
            "picked": len(feedback),
            "picked_disagree": _share([d for _, d in feedback]),
            "picked_chars": round(float(np.mean([text_chars(r, fields) for r, _ in feedback])), 1) if feedback else None,
        }
        if band is not None and probes:
            scores = [r.get("score", np.nan) for r in probes]
            lo, hi = band
            for name, (a, b) in (("below", (0.0, lo)), ("band", (lo, hi)), ("above", (hi, 1.0))):
                # The rank cut the strategy itself makes; a band reaching 0 or 1 leaves a range empty.
                picked = band_indices(scores, a, b) if a < b else np.array([], dtype=np.int64)
                row[f"probes_{name}"] = len(picked)
                row[f"disagree_{name}"] = _share([probe_dis[int(j)] for j in picked])
        rows.append(row)
    return rows


def _pooled(rows: list[dict], key: str, count: str, since: int = 0) -> float | None:
    """The share ``key`` pooled over iterations from ``since`` on, weighted by ``count``."""
    pairs = [(r[key], r[count]) for r in rows if r["iteration"] >= since and r.get(key) is not None]
    total = sum(n for _, n in pairs)
    return round(sum(v * n for v, n in pairs) / total, 3) if total else None


def summarise(energy: list[dict], random: list[dict]) -> dict:
    """The pooled shares the findings cite."""
    return {
        "energy_disagree_below": _pooled(energy, "disagree_below", "probes_below"),
        "energy_disagree_band": _pooled(energy, "disagree_band", "probes_band"),
        "energy_disagree_above": _pooled(energy, "disagree_above", "probes_above"),
        "picked_disagree": {"energy": _pooled(energy, "picked_disagree", "picked"),
                            "random": _pooled(random, "picked_disagree", "picked")},
        # Iteration 0 is shared by a forked pair; from iteration 1 on the band has played its part.
        "train_disagree_after_first_band": {"energy": _pooled(energy, "train_disagree", "train_records", since=1),
                                            "random": _pooled(random, "train_disagree", "train_records", since=1)},
    }


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def render(name: str, runs: dict[str, str], rows: dict[str, list[dict]], summary: dict) -> str:
    """The Markdown page."""
    cols = ["iteration", "accuracy", "train_records", "train_disagree", "train_chars", "picked",
            "picked_disagree", "picked_chars", "disagree_below", "disagree_band", "disagree_above"]
    lines = [f"# Feedback bands judged: {name}", "",
             "Written by `benchmarks/quality/bands.py` (do not edit by hand). Runs: "
             + ", ".join(f"{k} `{v}`" for k, v in runs.items()) + ". A disagreement is the judge's "
             "prediction differing from the sample's label.", ""]
    for arm, arm_rows in rows.items():
        lines += [f"## {arm}", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in arm_rows]
        lines.append("")
    lines += ["## Pooled", "", "```json", json.dumps(summary, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Judge both runs' samples and write the result files."""
    from gold_ray.run.tasks import load_task
    from gold_ray.student.predict import load_run_student

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("energy_run", type=Path)
    ap.add_argument("random_run", type=Path)
    ap.add_argument("--judge", type=Path, required=True, help="a finished run of the same task, other samples")
    ap.add_argument("--out", help="result name (default: the energy run's folder name)")
    args = ap.parse_args(argv)

    import yaml

    judge, task = load_run_student(args.judge)
    strategies = {}
    for run in (args.energy_run, args.random_run):
        if run.resolve() == args.judge.resolve():
            print(f"{run}: the judge must be a run with other samples, not one of the two", file=sys.stderr)
            return 2
        if load_task(run / "task.yaml").name != task.name:
            print(f"{run}: not a run of task {task.name!r} (the judge's)", file=sys.stderr)
            return 2
        strategies[run] = yaml.safe_load((run / "config.yaml").read_text())["strategy"]
    if (strategies[args.energy_run].get("score"), strategies[args.random_run].get("score")) != ("energy", "random"):
        print("the first run must score probes by energy and the second at random (strategy.score)", file=sys.stderr)
        return 2

    def disagrees(records: list[dict]) -> list[bool]:
        if not records:
            return []
        predicted = judge.predict([{f: str(r[f]) for f in task.field_names} for r in records])
        return [p != r["label"] for p, r in zip(predicted, records, strict=True)]

    strategy = strategies[args.energy_run]
    band = (float(strategy["band_lo"]), float(strategy["band_hi"]))
    fields = task.field_names
    rows = {"energy": run_rows(args.energy_run, disagrees, band, fields),
            "random": run_rows(args.random_run, disagrees, None, fields)}
    summary = summarise(rows["energy"], rows["random"])
    name = args.out or args.energy_run.name
    runs = {"energy": args.energy_run.name, "random": args.random_run.name, "judge": args.judge.name}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bands-{name}.json").write_text(json.dumps({"runs": runs, "band": band, "rows": rows,
                                                            "summary": summary}, indent=1) + "\n")
    (RESULTS / f"bands-{name}.md").write_text(render(name, runs, rows, summary))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
