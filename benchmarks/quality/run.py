"""Run the quality comparison: strategies x seeds on one task, each run's result written at once.

Usage::

    python benchmarks/quality/run.py --task sst2 --strategies gold,zerogen --seeds 0 --samples 512 \
        [--runtime local|ray] [--set key=value ...]

Each finished run writes ``results/<task>-<strategy>-s<seed>-n<samples>.json`` (accuracy, counts,
wall time, machine, the exact command). A run already finished is skipped; an interrupted one
resumes from its last committed stage, so the script can be stopped and restarted at will.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def machine() -> dict:
    """The machine a result was measured on."""
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every (strategy, seed) pair not yet finished; print a summary table."""
    from gold_ray.config import load_config
    from gold_ray.loop import distill_in_process

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--strategies", default="gold,zerogen")
    p.add_argument("--seeds", default="0")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--runtime", choices=("local", "ray"), default="local")
    p.add_argument("--runs-dir", default="runs/quality")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = []
    for strategy in args.strategies.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.task}-{strategy}-s{seed}-n{args.samples}"
            out = RESULTS / f"{name}.json"
            if out.is_file():
                rows.append(json.loads(out.read_text()))
                continue
            run_dir = Path(args.runs_dir) / name
            cfg = load_config(None, [f"task.name={args.task}", f"strategy.name={strategy}", f"seed={seed}",
                                     f"budget.samples={args.samples}", f"output.dir={run_dir}",
                                     "tracking.enabled=false", *args.set])
            t0 = time.time()
            resume = (run_dir / "state.json").is_file()
            if args.runtime == "ray":
                from actors.driver import run_on_ray

                metrics = run_on_ray(cfg, resume=resume)
            else:
                metrics = distill_in_process(cfg, resume=resume)
            final = metrics["final"]
            row = {
                "task": args.task, "strategy": strategy, "seed": seed, "budget": args.samples,
                "accuracy": final.get("accuracy"), "macro_f1": final.get("macro_f1"),
                "final_records": final.get("records"),
                "per_iteration_accuracy": [m.get("train", {}).get("accuracy") for m in metrics["iterations"]],
                "totals": metrics["totals"], "teacher_tokens": metrics["teacher_tokens"],
                "wall_s": round(time.time() - t0, 1), "resumed": resume, "runtime": args.runtime,
                "machine": machine(), "command": command, "overrides": args.set,
            }
            out.write_text(json.dumps(row, indent=2))
            rows.append(row)
            print(f"{name}: accuracy={row['accuracy']} wall={row['wall_s']}s", flush=True)
    for r in rows:
        print(f"{r['task']:<8} {r['strategy']:<8} seed {r['seed']} n={r['budget']}: acc {r['accuracy']}")
    write_summary()
    return 0


def write_summary() -> dict:
    """Aggregate every result file into ``summary.json`` and ``summary.md`` (mean and spread over seeds)."""
    import statistics

    groups: dict[tuple[str, str, int], list[dict]] = {}
    for path in sorted(RESULTS.glob("*-s*-n*.json")):
        row = json.loads(path.read_text())
        groups.setdefault((row["task"], row["strategy"], row["budget"]), []).append(row)
    summary: dict = {"tasks": {}, "teacher_fewshot": {}}
    lines = ["| task | strategy | budget | seeds | accuracy mean | std |", "| --- | --- | --- | --- | --- | --- |"]
    for (task, strategy, budget), rows in sorted(groups.items()):
        accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        mean = statistics.fmean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary["tasks"].setdefault(task, {})[strategy] = {"mean": mean, "std": std, "seeds": len(accs),
                                                            "budget": budget}
        lines.append(f"| {task} | {strategy} | {budget} | {len(accs)} | {mean:.4f} | {std:.4f} |")
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
