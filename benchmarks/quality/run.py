"""Run the quality comparison: strategies x seeds on one task, each run's result written at once.

Usage::

    python benchmarks/quality/run.py --task sst2 --strategies gold,zerogen --seeds 0 --samples 512 \
        [--runtime local|ray] [--set key=value ...] [--tag NAME] [--teacher-fewshot]

Each finished run writes ``results/<task>-<strategy>-s<seed>-n<samples>[-<tag>].json`` (accuracy,
counts, teacher, wall time, machine, the exact command). ``--tag`` names a variant of the default
setup (``--tag gemma3 --set teacher.model=embedded:gemma3-270m``): its runs and run folders are
kept apart, and the summary lists them as ``strategy@tag`` under ``variants``. With ``--fork`` a tagged
run starts from the first teacher pass of its untagged twin (same task, strategy and seed), which must
have run first: the two then differ only in what the tag changes after that pass (the random band).
A run already finished is skipped; an interrupted one resumes from its last committed stage, so the
script can be stopped and restarted at will.

``--teacher-fewshot`` first evaluates the teacher itself as a few-shot classifier on the task's
evaluation set (``results/<task>[-<tag>]-teacher-fewshot.json``, skipped when present; with a tag
it is a variant, listed in the summary under ``teacher_fewshot_variants``);
``--strategies ''`` then runs no distillation. ``--set task.eval_limit=N`` bounds that step to a
seeded random subset of N examples (the file records ``n`` and the full size).

Every invocation rewrites ``results/summary.json`` and ``summary.md`` from all result files
(:func:`write_summary`). Running, resuming, the teacher row and the statistics come from
:mod:`gold_ray.run.compare`, the module behind ``gold-ray compare``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RESULT_GLOB = "*-s*-n*.json"
FEWSHOT_SUFFIX = "-teacher-fewshot.json"
RECIPES_GLOB = "*-recipes-n*.json"


def machine() -> dict:
    """The machine a result was measured on, and the code's commit."""
    import subprocess

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit.stdout.strip() or None,
    }


def task_overrides(task: str, runs_dir: str) -> list[str]:
    """The ``--set`` items that select ``task``: a shipped task by name, or one of the benchmark's own.

    The benchmark's own tasks (``tasks/<name>.yaml``, written from scratch as a newcomer would) get
    their evaluation file prepared under ``<runs_dir>/data``, which becomes the run's ``task.data_dir``.
    """
    if str(HERE) not in sys.path:  # run.py is also loaded by path (the tests)
        sys.path.insert(0, str(HERE))
    from own_tasks import benchmark_tasks, prepare

    own = benchmark_tasks()
    if task not in own:
        return [f"task.name={task}"]
    data_dir = Path(runs_dir).absolute() / "data"
    prepare(task, data_dir)
    return [f"task.name={own[task]}", f"task.data_dir={data_dir}"]


def run_teacher_fewshot(task: str, overrides: list[str], command: str, tag: str = "",
                        runs_dir: str = "runs/quality") -> dict:
    """The teacher-as-classifier result of ``task``, computed once into ``results/<task>[-<tag>]-teacher-fewshot.json``.

    Args:
        task: Task name.
        overrides: ``--set`` overrides (teacher, ``task.eval_limit``, ...).
        command: The command line, recorded in the file.
        tag: Variant name (``--tag``), for another teacher than the benchmark's.

    Returns:
        The result row (``accuracy`` as a fraction, ``n`` examples scored, ``eval_total``).
    """
    from gold_ray.config import load_config
    from gold_ray.run.compare import eval_records, teacher_fewshot
    from gold_ray.run.tasks import load_task

    out = RESULTS / (f"{task}-{tag}{FEWSHOT_SUFFIX}" if tag else f"{task}{FEWSHOT_SUFFIX}")
    if out.is_file():
        return json.loads(out.read_text())
    cfg = load_config(None, [*task_overrides(task, runs_dir), "tracking.enabled=false", *overrides])
    total = len(eval_records(cfg.model_copy(update={"task": cfg.task.model_copy(update={"eval_limit": None})}),
                             load_task(cfg.task.name)))
    t0 = time.time()
    metrics = teacher_fewshot(cfg)
    row = {
        **metrics,
        "task": task,  # the benchmark's name, not the YAML path a task of its own resolves to
        "tag": tag,
        "eval_total": total,
        "subset": (f"seeded random subset (seed 0) of {metrics['n']} of {total} examples"
                   if metrics["n"] < total else "whole evaluation set"),
        "wall_s": round(time.time() - t0, 1), "machine": machine(), "command": command, "overrides": overrides,
    }
    out.write_text(json.dumps(row, indent=2))
    print(f"{task} teacher few-shot: accuracy={row.get('accuracy')} n={row['n']} wall={row['wall_s']}s", flush=True)
    return row


def recorded_command(argv: list[str]) -> str:
    """The command line a result file records: an absolute ``--runs-dir`` is written as ``$RUNS``, as
    ``variants.sh`` and ``demo_sets.sh`` name it, so no machine's folders go into the results."""
    shown = [shlex.quote(a) for a in argv]
    for i, arg in enumerate(argv):
        if arg == "--runs-dir" and i + 1 < len(argv) and Path(argv[i + 1]).is_absolute():
            shown[i + 1] = "$RUNS"
        elif arg.startswith("--runs-dir=") and Path(arg.split("=", 1)[1]).is_absolute():
            shown[i] = "--runs-dir=$RUNS"
    return "python benchmarks/quality/run.py " + " ".join(shown)


def main(argv: list[str] | None = None) -> int:
    """Run the teacher step (with ``--teacher-fewshot``) and every (strategy, seed) pair not yet finished."""
    from gold_ray.config import load_config
    from gold_ray.run.compare import execute_run, parse_strategies
    from gold_ray.run.loop import distill_in_process

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sst2", help="a shipped task, or one of tasks/*.yaml (e.g. math_ops)")
    p.add_argument("--strategies", default="gold,zerogen", help="comma list; '' runs no distillation")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--runtime", choices=("local", "ray"), default="local")
    p.add_argument("--runs-dir", default="runs/quality")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--tag", default="", help="variant name added to result and run names (e.g. gemma3)")
    p.add_argument("--fork", action="store_true",
                   help="start each run from the first teacher pass of the untagged run of the same task, strategy "
                        "and seed in --runs-dir (output.fork_from), so that a variant shares its iteration 0")
    p.add_argument("--teacher-fewshot", action="store_true",
                   help=f"evaluate the teacher as a few-shot classifier first (results/<task>{FEWSHOT_SUFFIX})")
    args = p.parse_args(argv)
    if args.tag and not args.tag.replace("_", "").isalnum():
        p.error(f"--tag must be letters, digits and underscores, got {args.tag!r}")
    if args.fork and not args.tag:
        p.error("--fork starts a tagged variant from its untagged twin's first teacher pass: give --tag")
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = recorded_command(argv or sys.argv[1:])
    if args.teacher_fewshot:
        run_teacher_fewshot(args.task, args.set, command, args.tag, args.runs_dir)
    strategies = parse_strategies(args.strategies) if args.strategies.strip() else []
    if args.runtime == "ray":
        from actors.driver import run_on_ray

        runner = run_on_ray
    else:
        runner = distill_in_process
    rows = []
    for strategy in strategies:
        for seed in (int(s) for s in args.seeds.split(",")):
            name = f"{args.task}-{strategy}-s{seed}-n{args.samples}" + (f"-{args.tag}" if args.tag else "")
            out = RESULTS / f"{name}.json"
            if out.is_file():
                rows.append(json.loads(out.read_text()))
                continue
            run_dir = Path(args.runs_dir) / name
            base = Path(args.runs_dir) / f"{args.task}-{strategy}-s{seed}-n{args.samples}"
            fork = [f"output.fork_from={base.absolute()}"] if args.fork else []
            cfg = load_config(None, [*task_overrides(args.task, args.runs_dir), f"strategy.name={strategy}", f"seed={seed}",
                                     f"budget.samples={args.samples}", f"output.dir={run_dir}",
                                     "tracking.enabled=false", *fork, *args.set])
            t0 = time.time()
            # A run folder from before a default changed must still resume, as it always did here.
            metrics, status = execute_run(cfg, runner, check_config=False)
            final = metrics["final"]
            row = {
                "task": args.task, "strategy": strategy, "seed": seed, "budget": args.samples,
                "tag": args.tag, "teacher": cfg.teacher.model,
                "accuracy": final.get("accuracy"), "macro_f1": final.get("macro_f1"),
                "final_loss": final.get("loss"), "final_recipe": final.get("recipe"), "sce": [cfg.student.sce_alpha, cfg.student.sce_beta],
                "final_records": final.get("records"),
                "per_iteration_accuracy": [m.get("train", {}).get("accuracy") for m in metrics["iterations"]],
                "first_band_student": first_band_student(metrics),
                "diversity": final.get("diversity"),
                "totals": metrics["totals"], "teacher_tokens": metrics["teacher_tokens"],
                "forked_from": metrics.get("forked_from") and Path(metrics["forked_from"]).name,
                "wall_s": round(time.time() - t0, 1), "resumed": status != "new", "runtime": args.runtime,
                "machine": machine(), "command": command, "overrides": args.set,
            }
            out.write_text(json.dumps(row, indent=2))
            rows.append(row)
            print(f"{name}: accuracy={row['accuracy']} wall={row['wall_s']}s", flush=True)
    for r in rows:
        print(f"{r['task']:<8} {r['strategy']:<8} seed {r['seed']} n={r['budget']}: acc {r['accuracy']}")
    write_summary(args.runs_dir)
    return 0


def first_band_student(metrics: dict) -> dict | None:
    """Iteration 0's student on its held-out synthetic split: the student that scores the probes the
    first feedback band is chosen from. ``{"accuracy", "majority", "records"}``, or None where the
    run's metrics do not record it."""
    iterations = metrics.get("iterations") or []
    train = (iterations[0].get("train") or {}) if iterations else {}
    if train.get("val_accuracy") is None or train.get("val_majority") is None:
        return None
    return {"accuracy": train["val_accuracy"], "majority": train["val_majority"], "records": train.get("val_records")}


NO_RUN = object()
"""What a :func:`_backfill` reader returns when the run folder lacks what it reads (the file is left as is)."""


def _backfill(runs_dir: str, field: str, missing: Callable[[dict], bool], value: Callable[[Path], Any]) -> list[Path]:
    """Set ``field`` of every strategy result file for which ``missing(row)`` holds to ``value(run_dir)``,
    read from its run folder under ``runs_dir`` unless that returns :data:`NO_RUN`; returns the files changed."""
    changed = []
    for path in sorted(RESULTS.glob(RESULT_GLOB)):
        row = json.loads(path.read_text())
        if "strategy" not in row or not missing(row):
            continue
        found = value(Path(runs_dir) / path.stem)
        if found is NO_RUN:
            continue
        row[field] = found
        path.write_text(json.dumps(row, indent=2))
        changed.append(path)
    return changed


def backfill_first_band(runs_dir: str) -> list[Path]:
    """Add ``first_band_student`` to result files written before the field existed, from their run
    folders under ``runs_dir`` where those still exist; returns the files changed."""
    def value(run_dir: Path) -> Any:
        metrics_file = run_dir / "metrics.json"
        return first_band_student(json.loads(metrics_file.read_text())) if metrics_file.is_file() else NO_RUN

    return _backfill(runs_dir, "first_band_student", lambda row: "first_band_student" not in row, value)


def backfill_diversity(runs_dir: str) -> list[Path]:
    """Add ``diversity`` (:func:`gold_ray.run.diversity.records_diversity` of every accepted training and
    probe record, as a run's final stage now measures it) to result files written before the field
    existed, from their run folders under ``runs_dir`` where those still exist; returns the files changed.
    A run whose synthetic test split was held out counts it here (the final stage leaves it out)."""
    from gold_ray.run.diversity import records_diversity
    from gold_ray.run.loop import TRAINING_PARTS
    from gold_ray.run.store import read_parts
    from gold_ray.run.tasks import load_task

    def value(run_dir: Path) -> Any:
        if not (run_dir / "state.json").is_file() or not (run_dir / "task.yaml").is_file():
            return NO_RUN
        parts = [run_dir / p for p in json.loads((run_dir / "state.json").read_text()).get("parts", [])
                 if Path(p).name.startswith(TRAINING_PARTS)]
        return records_diversity(read_parts(parts), load_task(str(run_dir / "task.yaml")).field_names)

    return _backfill(runs_dir, "diversity", lambda row: not row.get("diversity"), value)


def _diversity_cell(rows: list[dict]) -> str:
    """Mean distinct-bigram share and nearest-other overlap of the rows that measured them."""
    found = [r["diversity"] for r in rows if (r.get("diversity") or {}).get("nearest_overlap") is not None]
    if not found:
        return "—"
    return (f"{statistics.mean(d['distinct_2'] for d in found):.3f} / "
            f"{statistics.mean(d['nearest_overlap'] for d in found):.3f} ({len(found)})")


def _machine_text(m: dict) -> str:
    return f"{m.get('platform')}, {m.get('cpus')} CPUs, torch {m.get('torch')}, Python {m.get('python')}"


def _examples(row: dict) -> str:
    n, total = row.get("n"), row.get("eval_total")
    if total and n is not None and n < total:
        return f"{n} of {total} (seeded random subset)"
    return f"{n} (all)"


PAIRED = (("gold", "zerogen"), ("gold", "gold@randband"))

TARGET_OVER_TEACHER = 0.05
"""The default ``gold`` student's mean over seeds must beat the teacher row by this much on every task."""
TARGET_OVER_MAJORITY = 0.10
"""... and the majority class by this much."""
TARGET_OVER_ZEROGEN = 0.02
"""GOLD's pooled paired lead over ZeroGen, with its 95 % interval above 0."""
TARGET_FIRST_BAND = 0.15
"""Before the first feedback band is chosen, the in-loop student's accuracy on its held-out synthetic
split must beat that split's majority class by this much (mean over the ``gold`` seeds)."""


def targets(summary: dict) -> dict:
    """How the benchmark's results stand against its targets (points are fractions here).

    Per task with a ``gold`` row: its mean minus the teacher row and minus the majority class, each
    with whether it clears :data:`TARGET_OVER_TEACHER` and :data:`TARGET_OVER_MAJORITY` (None where a
    reference is missing), and the first band's student over its synthetic majority against
    :data:`TARGET_FIRST_BAND` (None where no run records it). Pooled: GOLD against ZeroGen (lead of at least :data:`TARGET_OVER_ZEROGEN`
    with the interval above 0) and the energy band against the random band (a lead with the interval
    above 0); None until a pair exists.
    """
    per_task = {}
    for task, strategies in sorted(summary["tasks"].items()):
        gold = (strategies.get("gold") or {}).get("mean")
        if gold is None:
            continue
        teacher = summary["teacher_fewshot"].get(task)
        majority = (summary["majority"].get(task) or {}).get("accuracy")
        over_teacher = None if teacher is None else gold - teacher
        over_majority = None if majority is None else gold - majority
        per_task[task] = {
            "gold": gold, "seeds": strategies["gold"]["seeds"],
            "over_teacher": over_teacher, "over_majority": over_majority,
            "teacher_met": None if over_teacher is None else over_teacher >= TARGET_OVER_TEACHER,
            "majority_met": None if over_majority is None else over_majority >= TARGET_OVER_MAJORITY,
        }
        first = (summary.get("first_band") or {}).get(task)
        per_task[task]["first_band_over_majority"] = first and first["over_majority"]
        per_task[task]["first_band_runs"] = first["runs"] if first else 0
        per_task[task]["first_band_records"] = sum(r or 0 for r in first["records"]) if first else 0
        per_task[task]["first_band_met"] = first and first["over_majority"] >= TARGET_FIRST_BAND

    def pooled(key: str, floor: float) -> dict | None:
        d = summary["paired"].get(key) or {}
        if not d.get("n") or d.get("mean") is None:
            return None
        return {"mean": d["mean"], "low": d.get("low"), "n": d["n"],
                "met": d["mean"] >= floor and d.get("low") is not None and d["low"] > 0}

    return {"tasks": per_task, "gold_over_zerogen": pooled("gold-zerogen", TARGET_OVER_ZEROGEN),
            "energy_over_random_band": pooled("gold-gold@randband", 0.0)}


def _target_cell(value: float | None, met: bool | None, floor: float) -> str | None:
    if value is None:
        return None
    return f"{value * 100:+.1f} ({'met' if met else f'{(floor - value) * 100:.1f} short'})"
"""The pooled paired differences of the summary: GOLD against ZeroGen, the energy band against a random one."""


def task_majority(task: str, rows: list[dict], runs_dir: str = "runs/quality") -> dict | None:
    """The majority class of ``task``'s evaluation examples, on the subset the runs were scored on.

    The runs' own ``task.*`` overrides (``task.eval_limit``, ``task.eval_path``) select the examples,
    so a set evaluated on a seeded 1,000 gets the majority of those 1,000.

    Returns:
        :func:`gold_ray.run.baselines.majority_class` of them (the same seeded subset
        :func:`gold_ray.student.evaluation.load_task_eval` draws), or ``{"error": ...}`` when there is
        no local evaluation file here (``$GOLD_RAY_DATA`` unset, say).
    """
    from gold_ray.config import load_config
    from gold_ray.run.baselines import majority_class
    from gold_ray.run.tasks import load_task
    from gold_ray.student.evaluation import load_eval_records, task_eval_file

    overrides = sorted({o for r in rows for o in (r.get("overrides") or []) if o.startswith("task.")})
    try:
        cfg = load_config(None, [*task_overrides(task, runs_dir), "tracking.enabled=false", *overrides])
        spec = load_task(cfg.task.name)
        # The local file the runs read (the data mirror, or task.eval_path): the summary never downloads.
        path = task_eval_file(spec, cfg.task)
        if path is None:
            return {"error": "no local evaluation file (set $GOLD_RAY_DATA to the data mirror)"}
        records = load_eval_records(spec, path, cfg.task.eval_limit)
        return majority_class(spec, records) or {"error": "not a classification task"}
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the summary is written without it, saying why
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def pooled_pairs(groups: dict[tuple[str, str], dict[int, list[dict]]], strategy: str, reference: str) -> dict:
    """``strategy`` minus ``reference`` pooled over every (task, seed) both finished at the same budget.

    Per task the largest budget both have results for; the statistics are
    :func:`gold_ray.run.compare.paired_difference` (the one function ``gold-ray compare`` uses too),
    over keys ``TASK/sSEED``.
    """
    from gold_ray.run.compare import paired_difference

    values: dict[str, float | None] = {}
    ref: dict[str, float | None] = {}
    hosts: dict[str, set] = {}
    forked: set[str] = set()
    tasks = sorted({t for t, _ in groups})
    for task in tasks:
        mine, theirs = groups.get((task, strategy), {}), groups.get((task, reference), {})
        common = set(mine) & set(theirs)
        if not common:
            continue
        budget = max(common)
        values.update({f"{task}/s{r['seed']}": r["accuracy"] for r in mine[budget]})
        ref.update({f"{task}/s{r['seed']}": r["accuracy"] for r in theirs[budget]})
        for r in [*mine[budget], *theirs[budget]]:
            hosts.setdefault(f"{task}/s{r['seed']}", set()).add(_host(r))
            if r.get("forked_from"):
                forked.add(f"{task}/s{r['seed']}")
    result = {"strategy": strategy, "reference": reference, **paired_difference(values, ref)}
    # The same seed is not the same data on another machine (the teacher samples on other
    # floating-point paths): such a pair measures the machines too.
    result["across_machines"] = sorted(k for k in result.get("pairs") or [] if len(hosts.get(k, ())) > 1)
    # A run made with --fork starts from its pair's first teacher pass: the two share iteration 0's
    # samples and probes wherever they ran.
    result["shared_first_pass"] = sorted(k for k in result.get("pairs") or [] if k in forked)
    return result


def _host(row: dict) -> tuple:
    m = row.get("machine") or {}
    return m.get("platform"), m.get("commit")


def write_summary(runs_dir: str = "runs/quality") -> dict:
    """Aggregate every result file into ``summary.json`` and ``summary.md``.

    Per task and strategy, only the largest budget that has results counts (smaller budgets are
    listed in ``summary.md`` but never mixed in): mean and sample standard deviation of the
    accuracy over its seeds (:func:`gold_ray.run.compare.metric_stats`). The teacher few-shot files
    give ``summary["teacher_fewshot"][task]``. Accuracies are fractions.

    Tagged runs (``--tag``) are kept out of ``tasks`` and listed under ``variants`` as
    ``STRATEGY@TAG``, with the same statistics. A recipe sweep (``recipe.py``) that has chosen a
    final-training recipe adds ``chosen_recipe[TASK]``: the recipe, the validation file, and the
    test accuracy statistics per strategy of the runs retrained with it.

    Per task, ``majority[TASK]`` is the majority-class accuracy of the task's evaluation examples
    (:func:`task_majority`, the runs' ``task.eval_limit`` subset). ``paired`` holds, for GOLD against
    ZeroGen and GOLD against ``gold@randband``, the difference pooled over every (task, seed) pair
    both finished (:func:`pooled_pairs`): mean, 95 % interval, n pairs and verdict. Per task,
    ``first_band[TASK]`` averages the ``gold`` runs' ``first_band_student`` (result files written
    before it existed get it from their run folder under ``runs_dir`` first, :func:`backfill_first_band`).

    Args:
        runs_dir: The benchmark's run folder (where its own tasks' evaluation files are prepared).

    Returns:
        ``{"tasks": {TASK: {STRATEGY: {"mean", "std", "seeds", "budget"}}}, "teacher_fewshot": {TASK: accuracy},
        "majority": {TASK: {"label", "accuracy", "n"} or {"error"}}, "paired": {"gold-zerogen": {...},
        "gold-gold@randband": {...}},
        "variants": {TASK: {"STRATEGY@TAG": {...}}}, "teacher_fewshot_variants": {TASK: {TAG: accuracy}}, "chosen_recipe": {TASK: {"recipe", "validation", "budget",
        "strategies": {STRATEGY: {"mean", "std", "seeds"}}}}}`` (the last two only when there is something to list).
    """
    from gold_ray.run.compare import markdown_table, metric_stats

    backfill_first_band(runs_dir)
    backfill_diversity(runs_dir)
    groups: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for path in sorted(RESULTS.glob(RESULT_GLOB)):
        if path.name.endswith(FEWSHOT_SUFFIX):
            continue
        row = json.loads(path.read_text())
        if "strategy" not in row or "seed" not in row:  # the analysis scripts' files share the folder
            continue
        key = row["strategy"] + (f"@{row['tag']}" if row.get("tag") else "")
        groups.setdefault((row["task"], key), {}).setdefault(row["budget"], []).append(row)
    fewshot, fewshot_variants = {}, []
    for path in sorted(RESULTS.glob(f"*{FEWSHOT_SUFFIX}")):
        row = json.loads(path.read_text())
        if row.get("tag"):
            fewshot_variants.append(row)
        else:
            fewshot[row["task"]] = row
    summary: dict = {"tasks": {}, "teacher_fewshot": {}}
    main_rows, other_rows, used = [], [], []
    for (task, strategy), by_budget in sorted(groups.items()):
        budget = max(by_budget)
        rows = sorted(by_budget[budget], key=lambda r: r["seed"])
        stats = metric_stats([r["accuracy"] for r in rows])
        section = "variants" if "@" in strategy else "tasks"
        summary.setdefault(section, {}).setdefault(task, {})[strategy] = {
            "mean": stats["mean"], "std": stats["std"], "seeds": stats["seeds"], "budget": budget}
        used += rows
        if strategy == "gold":
            firsts = [r["first_band_student"] for r in rows if r.get("first_band_student")]
            if firsts:
                summary.setdefault("first_band", {})[task] = {
                    "accuracy": statistics.mean(f["accuracy"] for f in firsts),
                    "majority": statistics.mean(f["majority"] for f in firsts),
                    "over_majority": statistics.mean(f["accuracy"] - f["majority"] for f in firsts),
                    "runs": len(firsts), "records": [f.get("records") for f in firsts]}
        main_rows.append([task, strategy, budget, stats["seeds"], stats["mean"], stats["std"],
                          ", ".join(f"s{r['seed']}: {r['accuracy']:.4f}" for r in rows),
                          ", ".join(f"{r['wall_s']:.0f}" + (" (resumed)" if r.get("resumed") else "") for r in rows),
                          rows[0].get("teacher") or "not recorded",
                          # Rows from before the field existed ran the default of their time, CE.
                          ", ".join(sorted({r.get("final_loss") or "ce" for r in rows})),
                          _diversity_cell(rows)])
        for small in sorted(b for b in by_budget if b != budget):
            old = sorted(by_budget[small], key=lambda r: r["seed"])
            s = metric_stats([r["accuracy"] for r in old])
            other_rows.append([task, strategy, small, s["seeds"], s["mean"], s["std"]])
    for task, row in sorted(fewshot.items()):
        summary["teacher_fewshot"][task] = row.get("accuracy")
    summary["majority"] = {}
    for task in sorted({t for t, _ in groups}):
        runs = [r for (t, _), by_budget in groups.items() if t == task for rows in by_budget.values() for r in rows]
        summary["majority"][task] = task_majority(task, runs, runs_dir)
    summary["paired"] = {f"{a}-{b}": pooled_pairs(groups, a, b) for a, b in PAIRED}
    for row in fewshot_variants:
        summary.setdefault("teacher_fewshot_variants", {}).setdefault(row["task"], {})[row["tag"]] = row.get("accuracy")
    recipe_rows = []
    for path in sorted(RESULTS.glob(RECIPES_GLOB)):
        sweep = json.loads(path.read_text())
        if sweep.get("chosen") is None:
            continue
        chosen = [r for r in sweep["rows"] if r["recipe"] == sweep["chosen"]]
        by_strategy: dict[str, list[float]] = {}
        for r in chosen:
            by_strategy.setdefault(r["strategy"], []).append(r["test_accuracy"])
        stats = {k: metric_stats(v) for k, v in sorted(by_strategy.items())}
        summary.setdefault("chosen_recipe", {})[sweep["task"]] = {
            "recipe": sweep["chosen"], "validation": sweep["validation"], "budget": sweep["samples"],
            "strategies": {k: {"mean": v["mean"], "std": v["std"], "seeds": v["seeds"]} for k, v in stats.items()}}
        recipe_rows += [[sweep["task"], sweep["samples"], sweep["chosen"], k, v["seeds"], v["mean"], v["std"]]
                        for k, v in stats.items()]
    lines = [
        "# Quality benchmark summary",
        "",
        "Written by `write_summary()` in `benchmarks/quality/run.py` from the result files in this folder "
        "(do not edit by hand; what the numbers mean is in `findings.md`). Accuracy on each task's evaluation set as a fraction; mean and sample "
        "standard deviation over seeds, at the largest budget (teacher samples per run, probes included) "
        "that has results for the task and strategy.",
        "",
        markdown_table(["task", "strategy", "budget", "seeds", "accuracy mean", "std", "per seed",
                        "wall time per run (s)", "teacher", "final loss", "distinct-2 / nearest overlap (runs)"],
                       main_rows),
        "",
        "The last column measures the generated data (`gold_ray.run.diversity`, up to 1,000 sampled "
        "texts of every accepted record): the share of distinct word pairs, and how much of a text's word pairs its "
        "nearest other text shares on average (lower is more varied); — where no run of the row measured it.",
    ]
    lines += ["## Majority class", "",
              "Every example predicted as the most frequent label of the task's evaluation examples (the same "
              "subset the runs are scored on).", "",
              markdown_table(["task", "label", "examples", "accuracy"],
                             [[t, m.get("label"), m.get("n"), m.get("accuracy")] if "error" not in m
                              else [t, f"not computed: {m['error']}", None, None]
                              for t, m in summary["majority"].items()])]
    lines += ["## Paired differences, pooled over tasks and seeds", "",
              "Each row: the first strategy's accuracy minus the second's on the same task and seed, over every "
              "(task, seed) pair both finished (per task at the largest budget both ran), with a 95 % interval "
              "(t over the paired differences). Ahead or behind: the interval excludes 0.", "",
              "A pair whose two runs ran on different machines or commits (\"across machines\") differs by "
              "more than the strategy: the same seed gives other teacher samples there, unless one run was "
              "forked from the other's first teacher pass (`--fork`: \"sharing the first pass\").", "",
              markdown_table(["strategy", "against", "pairs", "mean difference (points)", "95 % interval (points)",
                              "verdict", "pairs across machines", "pairs sharing the first pass"],
                             [[d["strategy"], d["reference"], d["n"],
                               None if d["mean"] is None else f"{d['mean'] * 100:+.2f}",
                               None if d["low"] is None else f"[{d['low'] * 100:+.2f}, {d['high'] * 100:+.2f}]",
                               d["verdict"], f"{len(d['across_machines'])} of {d['n']}",
                               f"{len(d.get('shared_first_pass') or [])} of {d['n']}"]
                              for d in summary["paired"].values()])]
    summary["targets"] = goals = targets(summary)
    pooled_rows = [[name, f"{d['mean'] * 100:+.2f}", None if d["low"] is None else f"{d['low'] * 100:+.2f}", d["n"],
                    "met" if d["met"] else "not met"]
                   for name, d in (("GOLD over ZeroGen (at least +2 points, interval above 0)", goals["gold_over_zerogen"]),
                                   ("energy band over random band (interval above 0)", goals["energy_over_random_band"]))
                   if d]
    lines += ["## Against the targets", "",
              f"The default `gold` student's mean over its seeds against the teacher row (target: at least "
              f"{TARGET_OVER_TEACHER * 100:+.0f} points) and the majority class (at least {TARGET_OVER_MAJORITY * 100:+.0f}), "
              "in points; where one is short, by how much.", "",
              f"The last column: before the first feedback band is chosen, iteration 0's student on its held-out "
              f"synthetic split over that split's majority class (target: at least {TARGET_FIRST_BAND * 100:+.0f}), "
              "mean over the runs that record it; the split holds about 20 records per run, so one run's "
              "figure is good to about 10 points.", "",
              markdown_table(["task", "gold mean", "seeds", "over the teacher row", "over the majority class",
                              "first band's student over its synthetic majority (runs, held-out records)"],
                             [[t, g["gold"], g["seeds"], _target_cell(g["over_teacher"], g["teacher_met"], TARGET_OVER_TEACHER),
                               _target_cell(g["over_majority"], g["majority_met"], TARGET_OVER_MAJORITY),
                               None if g["first_band_over_majority"] is None else
                               f"{_target_cell(g['first_band_over_majority'], g['first_band_met'], TARGET_FIRST_BAND)} "
                               f"({g['first_band_runs']}, {g['first_band_records']})"]
                              for t, g in goals["tasks"].items()])]
    if pooled_rows:
        lines += [markdown_table(["pooled over task and seed pairs", "mean (points)", "interval low (points)", "pairs",
                                  "target"], pooled_rows)]
    if fewshot or fewshot_variants:
        teacher_rows = [*sorted(fewshot.values(), key=lambda r: r["task"]),
                        *sorted(fewshot_variants, key=lambda r: (r["task"], r["tag"]))]
        lines += ["## Teacher as a few-shot classifier", "",
                  markdown_table(["task", "variant", "teacher", "prompt style", "demos", "examples", "accuracy",
                                  "macro-F1", "wall time (s)"],
                                 [[r["task"], r.get("tag") or "", r.get("teacher"), r.get("prompt_style"),
                                   r.get("demos"), _examples(r), r.get("accuracy"), r.get("macro_f1"),
                                   f"{r.get('wall_s', 0):.0f}"] for r in teacher_rows])]
    if recipe_rows:
        lines += ["## Final-training recipe chosen on validation (`recipe.py`)", "",
                  "Each run's final student retrained on the run's own data with the recipe that has the best "
                  "mean accuracy on the task's `seed.jsonl` (real examples, not the test set) over the swept runs; "
                  "test accuracy below. Details per recipe in `<task>-recipes-n<budget>.md`.", "",
                  markdown_table(["task", "budget", "recipe", "strategy", "seeds", "accuracy mean", "std"],
                                 recipe_rows)]
    everything = used + list(fewshot.values()) + fewshot_variants
    machines = sorted({_machine_text(r["machine"]) for r in everything if r.get("machine")})
    commands = sorted({r["command"] for r in everything if r.get("command")})
    lines += ["## Machines", ""] + [f"- {m}" for m in machines] + [""]
    lines += ["## Commands", "", "`$RUNS`: the runs folder the command was given (`variants.sh`, `demo_sets.sh`).", ""]
    lines += [f"- `{c}`" for c in commands] + [""]
    if other_rows:
        lines += ["## Smaller budgets (superseded; not in summary.json)", "",
                  markdown_table(["task", "strategy", "budget", "seeds", "accuracy mean", "std"], other_rows)]
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "summary.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
