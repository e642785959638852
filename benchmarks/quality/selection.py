"""Which synthetic validation score should pick a student's best epoch?

Usage::

    python benchmarks/quality/selection.py --runs runs/demo,runs/quality/sst2-gold-s0-n1000 --seeds 0,1

A training keeps the weights of its best epoch on the synthetic validation split (a seeded share of
the generated records, carrying the teacher's label noise). This script retrains the final student
of each finished run the way its final stage does (fresh student, the run's kept records and split,
the strategy's own loss and CE, the configured step floor and schedule), through every planned
epoch, and records after each epoch three candidate scores on the synthetic split:

- ``loss``: minus the mean CE loss (unbounded: one confident answer on a mislabelled record costs
  more than many right ones gain);
- ``accuracy``: the share right (moves in steps of 1/n on a split of a few dozen records);
- ``prob``: the mean probability of the record's label, i.e. one minus the mean absolute error,
  a bounded score that label noise cannot run away with (the same property that makes the reverse
  term of SCE noise-tolerant).

With ``--label-check`` the trainings use only the records the teacher, asked to classify them,
reads as the label it wrote them for (what ``teacher.check_labels`` keeps in a run; the run's own
data was written without the check), and their rows are tagged ``data: label_check``.

Each score's chosen epoch is then judged on the task's ``seed.jsonl`` (real labelled examples that
no strategy sees), which is what a default may be chosen on. Accuracy on the run's evaluation set
is recorded beside it to show the cost of each choice; it takes no part in the choice.

Writes ``results/selection.json`` (every run x loss x seed x epoch) and ``results/selection.md``
after each training, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "selection.json"
SCORES = ("loss", "accuracy", "prob")


def chosen_epoch(curve: list[dict], score: str) -> int:
    """The 1-based epoch ``score`` keeps: the best value, the earlier epoch on a tie."""
    key = {"loss": lambda p: -p["val_loss"], "accuracy": lambda p: p["val_accuracy"],
           "prob": lambda p: p["val_prob"]}[score]
    return max(curve, key=lambda p: (key(p), -p["epoch"]))["epoch"]


def summarise(rows: list[dict]) -> dict:
    """Per data (``all`` or ``label_check``): per score, the mean seed.jsonl and evaluation accuracy
    of the epochs it keeps, over the trainings on that data."""
    return {data: _summarise([r for r in rows if r.get("data", "all") == data])
            for data in sorted({r.get("data", "all") for r in rows})}


def _summarise(rows: list[dict]) -> dict:
    out = {}
    for score in (*SCORES, "last"):
        seed_acc, test_acc = [], []
        for row in rows:
            e = len(row["curve"]) if score == "last" else chosen_epoch(row["curve"], score)
            point = row["curve"][e - 1]
            seed_acc.append(point["seed_accuracy"])
            test_acc.append(point["test_accuracy"])
        if rows:
            out[score] = {"seed_accuracy": float(np.mean(seed_acc)), "test_accuracy": float(np.mean(test_acc)),
                          "trainings": len(rows)}
    return out


def paired_table(rows: list[dict]) -> str:
    """Last-epoch accuracies of each training on all records beside the same training on the
    records that pass the label check, and the mean differences."""
    from gold_ray.run.compare import markdown_table

    def key(r: dict) -> tuple:
        return r["run"], r["loss"], r["seed"]

    checked = {key(r): r for r in rows if r.get("data") == "label_check"}
    table, diffs = [], []
    for r in rows:
        other = checked.get(key(r)) if r.get("data", "all") == "all" else None
        if other is None:
            continue
        a, b = r["curve"][-1], other["curve"][-1]
        diffs.append((b["seed_accuracy"] - a["seed_accuracy"], b["test_accuracy"] - a["test_accuracy"]))
        table.append([r["run"], r["loss"], r["seed"], f"{r['n_train']} / {other['n_train']}",
                      f"{a['seed_accuracy']:.3f} / {b['seed_accuracy']:.3f}",
                      f"{a['test_accuracy']:.3f} / {b['test_accuracy']:.3f}"])
    if diffs:
        table.append(["mean difference", "", "", "", f"{np.mean([d[0] for d in diffs]):+.3f}",
                      f"{np.mean([d[1] for d in diffs]):+.3f}"])
    return markdown_table(["run", "loss", "seed", "records: all / checked", "seed.jsonl: all / checked",
                           "evaluation: all / checked"], table)


def render(summary: dict, rows: list[dict]) -> str:
    """The Markdown report."""
    from gold_ray.run.compare import markdown_table

    lines = ["# Which synthetic validation score picks the best epoch", "",
             "Written by `benchmarks/quality/selection.py`. Means over every training below; the choice "
             "is made on `seed.jsonl` accuracy, the evaluation accuracy only shows its cost.", "",
             markdown_table(["data", "score", "trainings", "seed.jsonl accuracy", "evaluation accuracy"],
                            [[d, s, v["trainings"], f"{v['seed_accuracy']:.4f}", f"{v['test_accuracy']:.4f}"]
                             for d, by_score in summary.items() for s, v in by_score.items()]), "",
             "## The label check, paired (last epoch of the same run, loss and seed)", "",
             paired_table(rows), "", "## Every training", ""]
    table = []
    for row in rows:
        picks = {s: chosen_epoch(row["curve"], s) for s in SCORES}
        table.append([row["run"], row.get("data", "all"), row["loss"], row["seed"], len(row["curve"]),
                      row["n_train"], row["n_val"],
                      " ".join(f"{s}:{e}" for s, e in picks.items()),
                      " ".join(f"{p['test_accuracy']:.3f}" for p in row["curve"])])
    lines.append(markdown_table(["run", "data", "loss", "seed", "epochs", "train", "val", "epoch kept by",
                                 "evaluation accuracy per epoch"], table))
    return "\n".join(lines) + "\n"


def label_readings(cfg: Any, task: Any, records: list[dict]) -> list[str]:
    """The label the run's teacher reads in each record (in this process, as a run's check does)."""
    from gold_ray.models import resolve_model
    from gold_ray.run.loop import resolve_prompt_style
    from gold_ray.student.evaluation import teacher_readings
    from gold_ray.teacher.engines import build_engine

    path = resolve_model(cfg.teacher.model)
    engine = build_engine(cfg.teacher, path, cfg.seed)
    return teacher_readings(engine, task, records, prompt_style=resolve_prompt_style(cfg, path),
                            max_demo_chars=cfg.strategy.max_demo_chars)


def record_epoch(fit_state: Any, *_: Any, student: Any, task: Any, val: list[dict], seed_set: list[dict],
                 test: list[dict], curve: list[dict], label: str) -> None:
    """``fit``'s ``on_epoch``: append the epoch's scores on the synthetic split, seed.jsonl and the
    evaluation set to ``curve``."""
    from gold_ray.student.evaluation import evaluate_student
    from gold_ray.student.influence import softmax
    from gold_ray.student.training import validation_metrics

    point = {"epoch": fit_state.epoch, "loss": fit_state.loss, **validation_metrics(student, val)}
    probs = softmax(student.logits(val))
    idx = [task.label_names.index(r["label"]) for r in val]
    point["val_prob"] = float(np.mean(probs[np.arange(len(val)), idx]))
    point["seed_accuracy"] = evaluate_student(student, task, seed_set)["accuracy"]
    point["test_accuracy"] = evaluate_student(student, task, test)["accuracy"]
    curve.append(point)
    print(f"{label} epoch {fit_state.epoch}: {json.dumps({k: round(v, 4) for k, v in point.items()})}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Retrain every (run, loss, seed) not yet in the results file, recording each epoch."""
    from gold_ray.config import load_config
    from gold_ray.models import resolve_model
    from gold_ray.run.compare import eval_records
    from gold_ray.run.loop import TRAINING_PARTS
    from gold_ray.run.rundir import run_task
    from gold_ray.run.store import load_state, read_parts
    from gold_ray.run.tasks import resolve_data_path
    from gold_ray.strategies import build_strategy
    from gold_ray.student.evaluation import load_eval_records
    from gold_ray.student.model import build_student
    from gold_ray.student.training import final_recipes, fit, synthetic_split

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="comma list of finished run folders (rows name them by folder name)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--label-check", action="store_true",
                   help="train on the records the teacher reads as their label (teacher.check_labels)")
    args = p.parse_args(argv)
    data = "label_check" if args.label_check else "all"
    rows: list[dict] = json.loads(OUT.read_text())["rows"] if OUT.is_file() else []
    done = {(r["run"], r.get("data", "all"), r["loss"], r["seed"]) for r in rows}
    readings: dict[str, list[str]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for run in args.runs.split(","):
            run_dir = Path(run)
            state = load_state(run_dir)
            if not state or not state.get("finished"):
                p.error(f"{run_dir} is not a finished run")
            cfg = load_config(run_dir / "config.yaml")
            task = run_task(run_dir)
            strategy = build_strategy(cfg.strategy.name)
            own = strategy.final_loss_for(cfg.student)
            records = read_parts([run_dir / q for q in state["parts"] if Path(q).name.startswith(TRAINING_PARTS)])
            if args.label_check:
                if run not in readings:
                    readings[run] = label_readings(cfg, task, records)
                records = [r for r, read in zip(records, readings[run], strict=True) if read in ("", r["label"])]
            # A fresh student, as the run's final stage trains: its split is topped up the same way.
            train, val = synthetic_split(records, cfg.student.val_share, cfg.seed, top_up=True)
            seed_set = load_eval_records(task, resolve_data_path(task.seed_path))
            test = eval_records(cfg, task)
            for recipe in final_recipes(cfg.student.model_copy(update={"final_loss": "auto"}), own, selectable=True):
                if (run_dir.name, data, recipe.name, seed) in done:
                    continue
                t0 = time.perf_counter()
                student = build_student(task, cfg.student, resolve_model(cfg.student.model), seed=seed)
                curve: list[dict] = []

                label = f"{run_dir.name} {data} {recipe.name} seed {seed}"
                on_epoch = functools.partial(record_epoch, student=student, task=task, val=val, seed_set=seed_set,
                                             test=test, curve=curve, label=label)
                # No validation records for fit itself: every planned epoch runs; the scores are
                # compared afterwards on the recorded curve.
                fit(student, train, recipe, seed=seed, on_epoch=on_epoch)
                rows.append({"run": run_dir.name, "data": data, "loss": recipe.name, "seed": seed, "n_train": len(train),
                             "n_val": len(val), "curve": curve, "seconds": round(time.perf_counter() - t0, 1)})
                summary = summarise(rows)
                OUT.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
                OUT.with_suffix(".md").write_text(render(summary, rows))
    print(json.dumps(summarise(rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
