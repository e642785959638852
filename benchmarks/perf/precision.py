"""Benchmark 8, student training precision: the final student of finished runs trained again in
float32 and in bfloat16 mixed precision, for time and for accuracy.

::

    python -m benchmarks.perf.precision --runs RUN_DIR[,RUN_DIR ...] [--variants loop,float32,bfloat16]
        [--out DIR]

For each finished run (any ``gold-ray distill`` run folder, e.g. the quality benchmark's), the final
stage's training is done again as the loop does it: a fresh student built with the run's seed, the
run's accepted records split into training and synthetic validation records by the run's seed
(:func:`gold_ray.student.training.synthetic_split`), and the recipe the run chose (its name in
``metrics.json``), once per variant:

- ``loop``: float32 with AdamW's per-tensor loop: the training before ``student.precision``
  existed (the optimiser patched back for this variant only);
- ``float32``: ``student.precision=float32`` (fused AdamW);
- ``bfloat16``: ``student.precision=bfloat16`` (fused AdamW, forward and backward under autocast).

Each variant reports its fit's wall time and steps, the last epoch's training loss, the accuracy on
the synthetic validation split, and the accuracy on the run's evaluation set (the set the run was
scored on, ``task.eval_limit`` included; it chooses nothing here, it only shows whether bfloat16
costs accuracy). Variants of a run are timed one after the other in one process, nothing else
computing: compare them as ratios within a run. ``loop`` reproduces the run's own final student
when the run was trained by the same code (a check of the set-up, shown as ``run's own``).

Results are rewritten after each fit, and a rerun skips the (run, variant) pairs already measured
in ``--out``'s result file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.perf.common import (
    RESULTS_DIR,
    command_line,
    fmt,
    log,
    markdown_table,
    new_result,
    stopwatch,
    write_result,
)

VARIANTS = ("loop", "float32", "bfloat16")
NAME = "training-precision"


@contextmanager
def _per_tensor_adamw() -> Iterator[None]:
    """AdamW without ``fused`` inside the block (the optimiser before ``student.precision``)."""
    import torch

    original = torch.optim.AdamW

    def loop_adamw(*args: Any, **kwargs: Any) -> Any:
        kwargs["fused"] = None
        return original(*args, **kwargs)

    # gold_ray.student.training.adamw looks the class up on torch.optim at each call.
    torch.optim.AdamW = loop_adamw  # type: ignore[misc]
    try:
        yield
    finally:
        torch.optim.AdamW = original  # type: ignore[misc]


def run_inputs(run_dir: Path) -> dict[str, Any]:
    """What a run's final stage trained on: config, task, records, split, recipe, evaluation set.

    Raises:
        SystemExit: the folder is not a finished run, or its recipe is none of the candidates.
    """
    from gold_ray.config import load_config
    from gold_ray.run.compare import eval_records
    from gold_ray.run.loop import TRAINING_PARTS
    from gold_ray.run.store import load_state, read_parts
    from gold_ray.run.tasks import load_task
    from gold_ray.strategies import build_strategy
    from gold_ray.student.training import final_recipes, synthetic_split

    state = load_state(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not state or not state.get("finished") or not metrics_path.is_file():
        raise SystemExit(f"{run_dir}: not a finished run (no finished state.json and metrics.json)")
    cfg = load_config(run_dir / "config.yaml")
    task = load_task(str(run_dir / "task.yaml"))
    final = json.loads(metrics_path.read_text(encoding="utf-8"))["final"]
    parts = [run_dir / q for q in state["parts"] if Path(q).name.startswith(TRAINING_PARTS)]
    records = read_parts(parts)
    # A fresh student, as the run's final stage trains: its split is topped up the same way.
    train, val = synthetic_split(records, cfg.student.val_share, cfg.seed, top_up=True)
    own = build_strategy(cfg.strategy.name).final_loss_for(cfg.student)
    candidates = final_recipes(cfg.student, own, selectable=True)
    recipe = next((r for r in candidates if r.name == final.get("recipe")), None)
    if recipe is None:
        raise SystemExit(f"{run_dir}: its final recipe {final.get('recipe')!r} is none of {[r.name for r in candidates]}")
    return {"cfg": cfg, "task": task, "train": train, "val": val, "recipe": recipe,
            "test": eval_records(cfg, task), "own_accuracy": final.get("accuracy")}


def fit_variant(inputs: dict[str, Any], variant: str) -> dict[str, Any]:
    """Train the run's final student once as ``variant``; its time, loss and accuracies."""
    from contextlib import nullcontext

    from gold_ray.models import resolve_model
    from gold_ray.student.evaluation import evaluate_student
    from gold_ray.student.model import build_student
    from gold_ray.student.training import fit

    cfg, task = inputs["cfg"], inputs["task"]
    precision = "float32" if variant == "loop" else variant
    student_cfg = cfg.student.model_copy(update={"precision": precision})
    student = build_student(task, student_cfg, str(resolve_model(cfg.student.model)), seed=cfg.seed, device="cpu")
    with _per_tensor_adamw() if variant == "loop" else nullcontext(), stopwatch() as t:
        result = fit(student, inputs["train"], inputs["recipe"], seed=cfg.seed, val_records=inputs["val"])
    test = evaluate_student(student, task, inputs["test"]) if inputs["test"] else {}
    return {"seconds": round(t["seconds"], 2), "steps": result["steps"], "epochs": result["epochs"],
            "seconds_per_step": round(t["seconds"] / max(1, result["steps"]), 4),
            "train_loss": result["loss"], "val_accuracy": result.get("val_accuracy"),
            "test_accuracy": test.get("accuracy"), "dtype": str(student.train_dtype).removeprefix("torch.")}


def summary_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant against ``loop`` on the same runs: median time ratio, mean accuracy differences."""
    by_run: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_run.setdefault(row["run"], {})[row["variant"]] = row
    out: dict[str, Any] = {}
    for variant in VARIANTS[1:]:
        pairs = [(v[variant], v["loop"]) for v in by_run.values() if variant in v and "loop" in v]
        if not pairs:
            continue
        tests = [a["test_accuracy"] - b["test_accuracy"] for a, b in pairs
                 if a["test_accuracy"] is not None and b["test_accuracy"] is not None]
        out[variant] = {
            "runs": len(pairs),
            "speedup_vs_loop_median": statistics.median(b["seconds_per_step"] / a["seconds_per_step"] for a, b in pairs),
            "test_accuracy_diff_mean": statistics.mean(tests) if tests else None,
            "test_accuracy_diff_min": min(tests) if tests else None,
            "test_accuracy_diff_max": max(tests) if tests else None,
            "val_accuracy_diff_mean": statistics.mean(a["val_accuracy"] - b["val_accuracy"] for a, b in pairs),
        }
    return out


def render(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The Markdown tables of the result."""
    lines = ["## Against `loop` (float32, per-tensor AdamW: the training before), same runs", "",
             markdown_table(["variant", "runs", "step time speed-up (median)", "evaluation accuracy difference, "
                             "points: mean [min, max]", "synthetic validation accuracy difference, points (mean)"],
                            [[v, s["runs"], fmt(s["speedup_vs_loop_median"]),
                              f"{100 * s['test_accuracy_diff_mean']:+.2f} [{100 * s['test_accuracy_diff_min']:+.2f}, "
                              f"{100 * s['test_accuracy_diff_max']:+.2f}]" if s["test_accuracy_diff_mean"] is not None
                              else "–", f"{100 * s['val_accuracy_diff_mean']:+.2f}"]
                             for v, s in summary.items()]),
             "", "## Every fit", "",
             markdown_table(["run", "records (train/val)", "recipe", "variant", "dtype", "steps", "seconds",
                             "s/step", "train loss", "synthetic val acc", "eval acc", "run's own"],
                            [[r["run"], f"{r['train_records']}/{r['val_records']}", r["recipe"], r["variant"],
                              r["dtype"], r["steps"], fmt(r["seconds"]), fmt(r["seconds_per_step"]),
                              fmt(r["train_loss"], 4), fmt(r["val_accuracy"], 4), fmt(r["test_accuracy"], 4),
                              fmt(r["own_accuracy"], 4)] for r in rows])]
    return "\n".join(lines) + "\n"


def portable_runs(runs: str) -> str:
    """``--runs`` as results record it: each run folder as ``<RUNS>/<name>``, so that no path of the
    machine that ran it goes into a committed result (the quality benchmark's folder is
    ``runs/quality``)."""
    return ",".join(f"<RUNS>/{Path(r).name}" for r in runs.split(",") if r)


def main(argv: list[str] | None = None) -> int:
    """Fit every (run, variant) pair not yet measured; write ``training-precision.json`` and ``.md``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="comma list of finished run folders")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder of the result files")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
    out_json = Path(args.out) / f"{NAME}.json"
    rows: list[dict[str, Any]] = json.loads(out_json.read_text())["metrics"]["fits"] if out_json.is_file() else []
    done = {(r["run"], r["variant"]) for r in rows}
    argv = list(sys.argv[1:] if argv is None else argv)
    shown = [portable_runs(a) if i and argv[i - 1] == "--runs" else a for i, a in enumerate(argv)]
    shown = [f"--runs={portable_runs(a[7:])}" if a.startswith("--runs=") else a for a in shown]
    result = new_result(NAME, command_line("benchmarks.perf.precision", shown),
                        {"runs": portable_runs(args.runs).split(","), "variants": variants})
    for run in args.runs.split(","):
        run_dir = Path(run)
        todo = [v for v in variants if (run_dir.name, v) not in done]
        if not todo:
            continue
        inputs = run_inputs(run_dir)
        for variant in todo:
            log(f"{run_dir.name}: {variant} ({len(inputs['train'])} records, {inputs['recipe'].name})")
            row = {"run": run_dir.name, "variant": variant, "recipe": inputs["recipe"].name,
                   "train_records": len(inputs["train"]), "val_records": len(inputs["val"]),
                   "own_accuracy": inputs["own_accuracy"], **fit_variant(inputs, variant)}
            rows.append(row)
            log(f"  {row['seconds']} s, {row['steps']} steps, eval {row['test_accuracy']}")
            summary = summary_of(rows)
            result["metrics"] = {"fits": rows, "summary": summary}
            result["headline"] = {f"{v}_speedup_vs_loop": s["speedup_vs_loop_median"] for v, s in summary.items()}
            write_result(result, render(rows, summary), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
