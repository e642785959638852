"""Benchmark 5, end to end: wall time of a GOLD iteration and of the whole demo, split by stage.

::

    python -m benchmarks.perf.e2e RUN_DIR [--out DIR]            # tabulate a finished run
    python -m benchmarks.perf.e2e --run-demo [--config demo] [--run-dir runs/perf-demo] [--overwrite]
        [--quick] [--set key=value ...] [--out DIR]              # run it on Ray first, then tabulate

Stage times come from the run's own ``metrics.json``: per iteration ``generate.seconds`` (teacher,
Ray Data and parsing, streamed together), ``probe.seconds`` (the same plus energy scoring;
``probe.score_seconds`` when run in-process), ``train.seconds`` (the whole train stage: fit,
checkpoint and evaluation; ``train.fit_seconds`` is the fit alone), and the
final stage (``final.seconds`` with ``final.fit.seconds`` inside it). Parsing and evaluation
have no time of their own in the metrics, so they are re-measured here on the run's own data
and final student (``--no-remeasure`` skips that): parsing every stored teacher answer again,
energy-scoring the probe samples, and evaluating the final student on the evaluation set.

With ``--run-demo`` each stage's wall time is also taken from the loop's progress events (time
between consecutive stage commits), which includes what the metrics leave out (Ray Train start,
checkpoints, evaluation, commits), and the whole run's wall time is exact; for a run read from
disk it is estimated from file times (``config.yaml`` to ``metrics.json``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.perf.common import (
    add_common_args,
    apply_threads,
    command_line,
    free_port,
    load_run_config,
    log,
    markdown_table,
    new_result,
    start_local_ray,
    stopwatch,
    write_result,
)

QUICK_OVERRIDES = ("budget.samples=8", "strategy.iterations=2", "task.eval_limit=20", "teacher.max_new_tokens=16",
                   "student.final_epochs=1")
"""Smoke-test size for ``--run-demo --quick``: a run of a few minutes whose numbers mean nothing."""


def _sec(d: dict[str, Any] | None, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return float(d) if isinstance(d, int | float) else None


def stage_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per iteration, and one for the final stage, from a run's ``metrics.json``.

    Returns:
        Dicts with ``iteration`` (``"final"`` for the last row), ``generate_s``, ``probe_s``,
        ``score_s``, ``train_s`` (fit only), ``final_s``, ``samples`` and ``output_tokens``;
        None where the run did not record the value.
    """
    rows = []
    for m in metrics.get("iterations", []):
        gen, probe = m.get("generate", {}), m.get("probe", {})
        rows.append({
            "iteration": m.get("iteration"),
            "generate_s": _sec(gen, "seconds"),
            "probe_s": _sec(probe, "seconds"),
            "score_s": _sec(probe, "score_seconds"),
            "train_s": _sec(m, "train", "seconds"),
            "final_s": None,
            "samples": (gen.get("requested") or 0) + (probe.get("requested") or 0),
            "output_tokens": (gen.get("output_tokens") or 0) + (probe.get("output_tokens") or 0),
        })
    final = metrics.get("final") or {}
    if final:
        rows.append({"iteration": "final", "generate_s": None, "probe_s": None, "score_s": None,
                     "train_s": _sec(final, "fit", "seconds"), "final_s": _sec(final, "seconds"),
                     "samples": None, "output_tokens": None})
    return rows


def event_walls(events: list[tuple[str, int, float]], t_start: float) -> dict[str, dict[str, float]]:
    """Wall seconds of each stage from progress events (stage, iteration, time of its commit).

    Each stage's time is the gap since the previous event (or ``t_start``).

    Returns:
        ``{"0": {"generate": s, "train": s, ...}, ..., "final": {"final": s}}``.
    """
    out: dict[str, dict[str, float]] = {}
    prev = t_start
    for stage, iteration, t in events:
        key = "final" if stage == "final" else str(iteration)
        out.setdefault(key, {})[stage] = out.get(key, {}).get(stage, 0.0) + (t - prev)
        prev = t
    return out


def iteration_summary(rows: list[dict[str, Any]], walls: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    """Seconds of one GOLD iteration: the median over iterations of the recorded stage sums, and of
    the event wall times when there are any."""
    its = [r for r in rows if r["iteration"] != "final"]
    recorded = [sum(v for v in (r["generate_s"], r["probe_s"], r["train_s"]) if v is not None) for r in its]
    out: dict[str, Any] = {"recorded_median_s": statistics.median(recorded) if recorded else None,
                           "recorded_per_iteration_s": recorded}
    if walls:
        per = [sum(v.values()) for k, v in walls.items() if k != "final"]
        out["wall_median_s"] = statistics.median(per) if per else None
        out["wall_per_iteration_s"] = per
    return out


def remeasure(run_dir: Path, cfg: Any) -> dict[str, Any]:
    """Time parsing, probe scoring and final evaluation again on the run's data and final student."""
    from gold_ray.run import store
    from gold_ray.run.tasks import load_task, resolve_data_path
    from gold_ray.student.evaluation import evaluate_student, load_eval_records
    from gold_ray.student.model import load_student
    from gold_ray.teacher.parsing import parse_generation
    from gold_ray.types import Prompt

    task = load_task(cfg.task.name)
    parts = sorted((run_dir / "data").glob("*.parquet"))
    records = store.read_parts(parts)
    out: dict[str, Any] = {"answers": len(records)}
    with stopwatch() as t:
        for r in records:
            # The stored prompt is not kept; the label and an empty chat turn are what parsing reads.
            prompt = Prompt(kind=r.get("kind") or "train", label=r.get("requested_label"),
                            messages=({"role": "user", "content": ""},))
            parse_generation(task, prompt, r.get("raw_text") or "")
    out["parse_s"] = t["seconds"]
    student_dir = run_dir / "student"
    if not student_dir.is_dir():
        return out
    student = load_student(student_dir, task, device="cpu")
    probes = [r for r in records if r.get("kind") == "probe" and r.get("reject_reason") is None]
    if probes:
        s = cfg.strategy
        with stopwatch() as t:
            student.ood_scores(probes, score=s.score, temperature=s.energy_temperature, mode=s.energy_mode)
        out.update(score_s=t["seconds"], scored=len(probes))
    path = cfg.task.eval_path
    eval_path = resolve_data_path(path, cfg.task.data_dir) if path else task.eval_path(cfg.task.data_dir)
    if eval_path is not None and Path(eval_path).is_file():
        ev = load_eval_records(task, eval_path, limit=cfg.task.eval_limit)
        with stopwatch() as t:
            evaluate_student(student, task, ev)
        out.update(evaluate_s=t["seconds"], evaluated=len(ev))
    return out


def run_demo(cfg: Any) -> tuple[float, list[tuple[str, int, float]], float]:
    """Run ``cfg`` on a private local Ray, recording each progress event's time.

    Returns:
        Wall seconds, the events (stage, iteration, time), and the start time.
    """
    from actors.driver import run_on_ray
    from gold_ray.reporting.progress import STAGE_EVENTS

    start_local_ray(cfg.resources.local_ray_cpus or max(4, os.cpu_count() or 1))
    events: list[tuple[str, int, float]] = []

    def on_event(stage: str, info: dict[str, Any]) -> None:
        if stage not in STAGE_EVENTS:
            return  # plan, within-stage progress, log
        events.append((stage, int(info.get("iteration", 0)), time.perf_counter()))
        log(f"e2e: iteration {info.get('iteration')} {stage} done")

    t0 = time.perf_counter()
    run_on_ray(cfg, on_event=on_event)
    wall = time.perf_counter() - t0
    import ray

    ray.shutdown()
    return wall, events, t0


def main(argv: list[str] | None = None) -> int:
    """Tabulate (and optionally first run) a run; write ``e2e.json`` and ``e2e.md``."""
    import json

    from gold_ray.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=1)
    p.add_argument("run_dir", nargs="?", help="a finished run directory to tabulate")
    p.add_argument("--run-demo", action="store_true", help="run --config on Ray first (into --run-dir)")
    p.add_argument("--run-dir", dest="demo_dir", default="runs/perf-demo", help="where --run-demo writes its run")
    p.add_argument("--overwrite", action="store_true", help="let --run-demo replace a run already in --run-dir")
    p.add_argument("--no-remeasure", action="store_true", help="do not re-time parse, score and evaluate")
    args = p.parse_args(argv)
    apply_threads(args)
    if bool(args.run_dir) == bool(args.run_demo):
        p.error("give either RUN_DIR (a finished run) or --run-demo")
    wall, walls, mode = None, None, "read"
    if args.run_demo:
        extra = [f"output.dir={args.demo_dir}", f"teacher.serve.port={free_port()}"]
        extra += list(QUICK_OVERRIDES) if args.quick else []
        extra += ["output.overwrite=true"] if args.overwrite else []
        cfg = load_run_config(args, extra)
        log(f"e2e: running {args.config} on Ray into {args.demo_dir}")
        wall, events, t0 = run_demo(cfg)
        walls = event_walls(events, t0)
        run_dir, mode = Path(args.demo_dir), "ran"
    else:
        run_dir = Path(args.run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        p.error(f"{run_dir}: no metrics.json (not a run directory, or the run has not committed a stage)")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    cfg_path = run_dir / "config.yaml"
    run_cfg = load_config(cfg_path) if cfg_path.is_file() else load_run_config(args)
    if wall is None and cfg_path.is_file():
        wall = metrics_path.stat().st_mtime - cfg_path.stat().st_mtime
    rows = stage_rows(metrics)
    its = iteration_summary(rows, walls)
    again = {} if args.no_remeasure else remeasure(run_dir, run_cfg)
    result = new_result("e2e", command_line("benchmarks.perf.e2e", argv), {
        "run_dir": str(run_dir), "mode": mode, "config": args.config if args.run_demo else str(cfg_path),
        "overrides": args.set, "quick": args.quick, "strategy": metrics.get("strategy"), "task": metrics.get("task"),
        "iterations": len(metrics.get("iterations", [])), "budget_samples": run_cfg.budget.samples,
        "finished": bool(metrics.get("final")),
    })
    result["metrics"] = {"stages": rows, "event_walls": walls, "iteration": its, "run_wall_s": wall,
                         "run_wall_source": "measured" if mode == "ran" else "file times (config.yaml to metrics.json)",
                         "remeasured": again, "final": {k: v for k, v in (metrics.get("final") or {}).items()
                                                        if isinstance(v, int | float)}}
    result["headline"] = {"e2e_iteration_s": its.get("wall_median_s") or its.get("recorded_median_s"),
                          "e2e_demo_s": wall}
    table = markdown_table(
        ["iteration", "generate s (teacher+parse)", "probe s (teacher+parse+score)", "score s (in-process)",
         "train s (fit)", "final stage s", "samples", "output tokens"],
        [[r["iteration"], r["generate_s"], r["probe_s"], r["score_s"], r["train_s"], r["final_s"], r["samples"],
          r["output_tokens"]] for r in rows])
    body = [f"## {metrics.get('strategy')} on {metrics.get('task')}: {run_dir} ({mode})", "",
            "### Stage times from metrics.json", "", table, "",
            f"One iteration (median, recorded stages): {its.get('recorded_median_s') and round(its['recorded_median_s'], 1)} s; "
            f"whole run: {wall and round(wall, 1)} s ({result['metrics']['run_wall_source']})."]
    if walls:
        stages = ["generate", "train", "probe", "feedback", "final"]
        body += ["", "### Stage wall times from the run's progress events", "",
                 markdown_table(["iteration", *stages, "sum"],
                                [[k, *[v.get(s) for s in stages], sum(v.values())] for k, v in walls.items()])]
    if again:
        body += ["", "### Re-measured on the run's data and final student (this machine, now)", "",
                 markdown_table(["step", "seconds", "items"],
                                [["parse every stored answer", again.get("parse_s"), again.get("answers")],
                                 ["energy-score the probes", again.get("score_s"), again.get("scored")],
                                 ["evaluate the final student", again.get("evaluate_s"), again.get("evaluated")]])]
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"e2e: wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
