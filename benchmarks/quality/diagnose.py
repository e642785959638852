"""What happened inside quality runs, iteration by iteration: the evidence for why a strategy wins or not.

Usage::

    python benchmarks/quality/diagnose.py --task sst2 [--samples 1000] [--runs-dir runs/quality]

For every run folder ``<task>-<strategy>-s<seed>-n<samples>[-<tag>]`` (finished or not) it reads the
committed ``metrics.json`` and data parts and writes ``results/<task>-diagnostics-n<samples>.json``
and ``.md``, one row per run and iteration:

- the in-loop student's training loss and test accuracy after that iteration's training
  (a loss near ln K for K labels means it has learnt almost nothing yet);
- the spread of the probes' OOD scores (energy: 10th to 90th percentile). The feedback band is a
  rank band, so when this spread is tiny the band picks probes by noise, not by familiarity;
- feedback pool size, and the mean length in characters of the training samples, the probes
  and the feedback shown in the next prompts, against the evaluation set's mean length
  (drift in length is drift away from the task's distribution).

For every finished run it adds one row on its final student: its accuracy on the synthetic
validation split it was chosen on against the same on the real evaluation set, the real set's
majority class and the teacher row, its recall per label, and the label shares of the accepted
samples it trained on. A student that fits the teacher's samples but not the real set learned
the teacher's version of the task; one whose recall leans to a label the real set rarely holds
loses to the majority class on a skewed set.

It reads files only; nothing is trained or generated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _mean_chars(records: list[dict], key: str) -> float | None:
    texts = [str(r.get(key) or "") for r in records]
    return round(sum(map(len, texts)) / len(texts), 1) if texts else None


def run_rows(run_dir: Path, text_key: str) -> list[dict]:
    """One diagnostics row per committed iteration of the run in ``run_dir``."""
    from gold_ray.run.store import read_parts

    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        return []
    metrics = json.loads(metrics_file.read_text())
    data = run_dir / "data"
    by_id: dict[str, dict] = {}
    rows = []
    for it in metrics.get("iterations", []):
        i = it["iteration"]
        train = read_parts([p for p in [data / f"train-it{i:03d}.parquet"] if p.is_file()])
        probes = read_parts([p for p in [data / f"probe-it{i:03d}.parquet"] if p.is_file()])
        by_id.update({r["id"]: r for r in probes})
        feedback = [by_id[f] for f in (it.get("feedback") or {}).get("ids", []) if f in by_id]
        scores = (it.get("probe") or {}).get("scores") or {}
        spread = scores["p90"] - scores["p10"] if {"p10", "p90"} <= scores.keys() else None
        tr = it.get("train") or {}
        rows.append({
            "run": run_dir.name, "iteration": i,
            "train_loss": tr.get("loss"), "in_loop_accuracy": tr.get("accuracy"), "train_records": tr.get("records"),
            "probe_score_p10": scores.get("p10"), "probe_score_p90": scores.get("p90"),
            "probe_score_spread": spread, "feedback_size": (it.get("feedback") or {}).get("size"),
            "train_chars": _mean_chars(train, text_key), "probe_chars": _mean_chars(probes, text_key),
            "feedback_chars": _mean_chars(feedback, text_key),
        })
    return rows


def final_row(run_dir: Path) -> dict | None:
    """The final student's row of the run in ``run_dir`` (see the module docstring); None until it finished."""
    from collections import Counter

    from gold_ray.run.baselines import synthetic_fit
    from gold_ray.run.store import read_parts

    metrics_file = run_dir / "metrics.json"
    final = json.loads(metrics_file.read_text()).get("final") if metrics_file.is_file() else None
    if not final or "accuracy" not in final:
        return None
    fitted, fitted_majority = synthetic_fit(final)
    baselines = final.get("baselines") or {}
    parts = sorted(p for p in (run_dir / "data").glob("*.parquet") if p.name.startswith(("train-", "probe-")))
    labels = Counter(str(r.get("label")) for r in read_parts(parts))
    total = sum(labels.values())
    return {
        "run": run_dir.name, "recipe": final.get("recipe"), "records": final.get("records"),
        "synthetic_val_accuracy": fitted, "synthetic_val_majority": fitted_majority,
        "accuracy": final["accuracy"], "majority": (baselines.get("majority") or {}).get("accuracy"),
        "teacher_fewshot": (baselines.get("teacher_fewshot") or {}).get("accuracy"),
        "recall": final.get("per_label_accuracy") or {},
        "train_label_shares": {k: round(n / total, 3) for k, n in sorted(labels.items())} if total else {},
    }


def _shares(values: dict) -> str:
    return ", ".join(f"{k} {_fmt(v, 2)}" for k, v in values.items())


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    """Write the diagnostics of every run folder of ``--task`` at ``--samples``."""
    from gold_ray.config import load_config
    from gold_ray.run.compare import eval_records, markdown_table
    from gold_ray.run.tasks import load_task

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--runs-dir", default="runs/quality")
    args = p.parse_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from own_tasks import benchmark_tasks

    own = benchmark_tasks()  # the benchmark's own tasks load from their files, named as run.py names them
    task = load_task(str(own[args.task]) if args.task in own else args.task)
    text_key = task.input_fields[0].name
    rows, finals, eval_chars = [], [], None
    for run_dir in sorted(Path(args.runs_dir).glob(f"{args.task}-*-s*-n{args.samples}*")):
        rows += run_rows(run_dir, text_key)
        final = final_row(run_dir)
        if final:
            finals.append(final)
        if eval_chars is None and (run_dir / "config.yaml").is_file():
            # The evaluation set the runs were scored on, as their config names it.
            eval_chars = _mean_chars(eval_records(load_config(run_dir / "config.yaml"), task), text_key)
    if not rows:
        p.error(f"no run folders for {args.task} at {args.samples} samples under {args.runs_dir}")
    chance_loss = math.log(len(task.labels)) if task.labels else None
    out = RESULTS / f"{args.task}-diagnostics-n{args.samples}"
    out.with_suffix(".json").write_text(json.dumps(
        {"task": args.task, "samples": args.samples, "eval_mean_chars": eval_chars, "chance_loss": chance_loss,
         "rows": rows, "finals": finals}, indent=2))
    header = ["run", "it", "in-loop loss", "in-loop acc", "probe energy p10", "p90", "spread", "feedback",
              "train chars", "probe chars", "feedback chars"]
    table = [[r["run"], r["iteration"], _fmt(r["train_loss"]), _fmt(r["in_loop_accuracy"]),
              _fmt(r["probe_score_p10"]), _fmt(r["probe_score_p90"]), _fmt(r["probe_score_spread"]),
              _fmt(r["feedback_size"]), _fmt(r["train_chars"], 0), _fmt(r["probe_chars"], 0),
              _fmt(r["feedback_chars"], 0)] for r in rows]
    text = [f"# Inside the {args.task} runs at {args.samples} samples", "",
            "Written by `benchmarks/quality/diagnose.py` from the run folders (read only). "
            f"Chance-level training loss: {_fmt(chance_loss)} (ln of the label count); "
            f"mean length of the evaluation set's texts: {_fmt(eval_chars, 0)} characters.", "",
            markdown_table(header, table)]
    if finals:
        text += ["## The final students", "",
                 "Accuracy on the synthetic validation split the final recipe was chosen on, against the real "
                 "evaluation set; recall per label on the real set; label shares of the accepted samples.", "",
                 markdown_table(
                     ["run", "recipe", "records", "synthetic val acc", "its majority", "real acc", "majority class",
                      "teacher row", "recall per label", "training label shares"],
                     [[f["run"], f["recipe"], _fmt(f["records"]), _fmt(f["synthetic_val_accuracy"]),
                       _fmt(f["synthetic_val_majority"]), _fmt(f["accuracy"]), _fmt(f["majority"]),
                       _fmt(f["teacher_fewshot"]), _shares(f["recall"]), _shares(f["train_label_shares"])]
                      for f in finals])]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
