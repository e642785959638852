"""Benchmark 7, student training: the fixed cost of a training on Ray Train over the same fit in process.

::

    python -m benchmarks.perf.training [--quick] [--records 64] [--epochs 2] [--repeats 3] [--config demo]
        [--set resources.train_workers=1 ...] [--out DIR]

Every side trains the config's student (a fresh head, built with the run seed) on the same
records, generated from the task's seed demonstrations (never its evaluation set), with the same
recipe (``--epochs`` epochs at ``student.lr``):

- ``in_process``: :func:`gold_ray.student.training.fit` in this process (what ``--local`` does);
- ``ray_kept``: :class:`actors.training.RayTrainStep` with one worker group kept for every
  training (``resources.train_keep_workers``, the default): the first training pays the group's
  start (reported apart), the repeats after it are what every later iteration pays;
- ``ray_per_training``: the same step with ``train_keep_workers=false``: a new worker group (one
  ``TorchTrainer.fit()``) per training, as before the group was kept.

The fixed cost of a side is its median wall time minus the in-process median: what Ray adds to a
training of this size (the training itself is the same work, with the same threads). Both Ray
sides run on a private local Ray started once. The trained weights of every side are compared with
the in-process ones (same seed, same batches: they must agree).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.perf.common import (
    add_common_args,
    apply_threads,
    command_line,
    load_run_config,
    log,
    markdown_table,
    median_of,
    new_result,
    ratio,
    repeats_of,
    spread_cell,
    start_local_ray,
    stopwatch,
    summarize,
    write_result,
)


def training_records(task: Any, n: int) -> list[dict[str, Any]]:
    """``n`` labelled records made from the task's seed demonstrations, each text numbered so that
    no two are equal."""
    demos = list(task.seed_demos)
    if not demos:
        raise SystemExit(f"task {task.name!r} has no seed demonstrations to build training records from")
    out = []
    for i in range(n):
        rec = dict(demos[i % len(demos)])
        first = task.field_names[0]
        rec[first] = f"{rec.get(first, '')} ({i})"
        out.append(rec)
    return out


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    """Time the three sides; write ``training.json`` and ``training.md``."""
    import torch

    from gold_ray.models import resolve_model
    from gold_ray.run.tasks import load_task
    from gold_ray.student.model import build_student
    from gold_ray.student.training import Recipe, fit

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--records", type=int, default=None, help="records per training (default 64; --quick 16)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per training (default 2)")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default max(4, cores))")
    args = p.parse_args(argv)
    apply_threads(args)
    cfg = load_run_config(args, ["tracking.enabled=false"])
    repeats = repeats_of(args)
    n = args.records or (16 if args.quick else 64)
    task = load_task(cfg.task.name)
    records = training_records(task, n)
    student_path = str(resolve_model(cfg.student.model))
    recipe = Recipe(loss="ce", lr=cfg.student.lr, epochs=args.epochs, max_epochs=args.epochs)
    res = cfg.resources
    result = new_result("training", command_line("benchmarks.perf.training", argv), {
        "student": cfg.student.model, "task": cfg.task.name, "records": n, "epochs": args.epochs,
        "batch_size": cfg.student.batch_size, "repeats": repeats, "quick": args.quick,
        "train_workers": res.train_workers, "train_cpus_per_worker": res.train_cpus_per_worker,
        "train_checkpoint_every_s": res.train_checkpoint_every_s, "config": args.config, "overrides": args.set,
    })

    def fresh() -> Any:
        return build_student(task, cfg.student, student_path, seed=cfg.seed, device="cpu")

    log(f"training: in process, {n} records x {args.epochs} epochs, {torch.get_num_threads()} torch thread(s)")
    local_runs, want = [], None
    for i in range(repeats):
        student = fresh()
        with stopwatch() as t:
            fit(student, records, recipe, seed=cfg.seed)
        local_runs.append(t["seconds"])
        want = student.model.state_dict()
        log(f"  repeat {i}: {t['seconds']:.2f}s")

    from actors.training import RayTrainStep

    ray = start_local_ray(args.ray_cpus or max(4, os.cpu_count() or 1))
    sides: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="perf-train-") as tmp:
        for side, keep in (("ray_kept", True), ("ray_per_training", False)):
            side_cfg = cfg.model_copy(update={"resources": res.model_copy(update={"train_keep_workers": keep})})
            step, runs, first, diffs, pids = None, [], None, [], set()
            try:
                # The kept group's first training also starts the group: timed apart, as a run pays it
                # once, beside its teacher's start.
                for i in range(repeats + (1 if keep else 0)):
                    if step is None or not keep:
                        # A group per training gets a storage folder per training: in one folder the
                        # same order would find its finished checkpoint and not train again.
                        if step is not None:
                            step.close()
                        step = RayTrainStep(side_cfg, cfg.task.name, student_path, Path(tmp) / side / str(i),
                                            keep_workers=keep)
                    student = fresh()
                    with stopwatch() as t:
                        metrics = step(student, records, recipe)
                    diffs.append(_max_diff(student.model.state_dict(), want))
                    pids.add(metrics.get("worker_pid"))
                    if keep and i == 0:
                        first = t["seconds"]
                        log(f"  {side} first (starts the group): {first:.2f}s")
                        continue
                    runs.append(t["seconds"])
                    log(f"  {side} repeat {len(runs) - 1}: {t['seconds']:.2f}s")
            finally:
                if step is not None:
                    step.close()
            sides[side] = {"seconds": summarize(runs), "first_seconds": first, "max_abs_weight_diff": max(diffs),
                           "worker_processes": len(pids)}
        ray.shutdown()

    local = median_of(summarize(local_runs))
    for side in sides.values():
        median = median_of(side["seconds"])
        side["fixed_cost_s"] = None if median is None or local is None else median - local
        side["over_in_process"] = ratio(median, local)
    kept, per = sides["ray_kept"], sides["ray_per_training"]
    result["metrics"] = {"in_process": {"seconds": summarize(local_runs)}, **sides}
    result["headline"] = {
        "train_fixed_cost_ray_s": kept["fixed_cost_s"],
        "train_fixed_cost_ray_per_training_s": per["fixed_cost_s"],
        "train_group_start_s": None if kept["first_seconds"] is None or median_of(kept["seconds"]) is None
        else kept["first_seconds"] - median_of(kept["seconds"]),
    }
    worst = max(kept["max_abs_weight_diff"], per["max_abs_weight_diff"])
    result["notes"] += [
        f"Every Ray training ended on the in-process weights to {worst:.2e} (max absolute difference).",
        f"The kept group served its {repeats + 1} trainings from {kept['worker_processes']} worker process(es).",
    ]
    rows = [
        ["in process", spread_cell(result["metrics"]["in_process"]["seconds"]), "—", "—"],
        ["Ray, one worker group kept", spread_cell(kept["seconds"]), kept["fixed_cost_s"], kept["over_in_process"]],
        ["Ray, a worker group per training", spread_cell(per["seconds"]), per["fixed_cost_s"], per["over_in_process"]],
    ]
    body = [
        f"## Student training: {cfg.student.model}, {n} records x {args.epochs} epochs "
        f"(batch {cfg.student.batch_size}), {repeats} repeat(s)", "",
        markdown_table(["side", "seconds per training", "fixed cost over in process (s)", "x in process"], rows),
        "", f"The kept group's first training took {kept['first_seconds']:.1f} s (it starts the group, once per run).",
    ]
    jp, mp = write_result(result, "\n".join(body), args.out)
    log(f"training: wrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
