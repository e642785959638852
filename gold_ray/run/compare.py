"""Compare data strategies on one task at one budget: ``gold-ray compare``.

For every strategy x seed, one distillation runs with the same teacher, student, budget
(``budget.samples`` counts every teacher sample, probes included, and ``budget.max_teacher_tokens``
caps output tokens alike) and seed, each in its own run directory::

    OUT/
      runs/<strategy>-s<seed>/    one ordinary run directory per run (see gold_ray.run.store)
      teacher_fewshot.json        the teacher as a few-shot classifier on the same eval set (a copy of
                                  the cached row, see gold_ray.run.baselines)
      scores/<strategy>-s<seed>.json  OOD scores of the run's accepted data (for the plot)
      compare.json, compare.md    the table: metric mean and spread over seeds per strategy
      compare.png                 metric per iteration per strategy; score distributions
      compare-state.json          the MLflow parent run, so a rerun continues under it
      mlflow.db                   the MLflow store, unless tracking.tracking_uri names one

Rerunning the same command continues: finished runs (``state.json`` says finished) are skipped,
interrupted ones resume from their last committed stage, the teacher row and the scores are
read back. A run directory whose config differs from the planned one (other than ``output``
and ``tracking``) is an error rather than being mixed into the table.

Choices where the issue leaves room:

- ``--seeds N`` means the seeds ``0 .. N-1``; a comma list (``3,7`` or ``5,``) names the seeds.
- The spread is the sample standard deviation over seeds (n - 1 in the denominator; 0 for one seed).
- Score distributions: every strategy's accepted data (training and probe parts, never rejects)
  is scored by that run's *final* student with the configured OOD score (``strategy.score``,
  energy by default). Strategies without probes store no scores during the run, and probe
  scores come from a student that was still training, so scoring everything the same way
  afterwards is the only like-for-like view.
- The teacher-as-classifier row runs in the calling process (one forward pass per evaluation
  example and label), with the task's seed demos as few-shot examples and the teacher's own
  prompt style; ``task.eval_limit`` bounds it like it bounds the students' evaluation.
- MLflow: one parent run per comparison (table metrics and files as artifacts); every
  strategy x seed run is a child of it (``tracking.parent_run_id``), with Ray Train's runs
  below those as usual.

This module imports no Ray: the runner that executes one run is passed in
(:func:`gold_ray.run.loop.distill_in_process`, or ``actors.driver.run_on_ray``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gold_ray.config import ConfigError, RunConfig, load_config
from gold_ray.errors import InputError
from gold_ray.reporting.tracking import MlflowTracker, flatten_params
from gold_ray.run import baselines, store
from gold_ray.run.loop import EventFn, RunDirError, distill_in_process
from gold_ray.run.tasks import TaskSpec, load_task
from gold_ray.types import Generation, Prompt, TeacherEngine

RUNS_DIR = "runs"
SCORES_DIR = "scores"
TABLE_JSON = "compare.json"
TABLE_MD = "compare.md"
PLOT_PNG = "compare.png"
STATE_JSON = "compare-state.json"
FEWSHOT_JSON = "teacher_fewshot.json"
TEACHER_ROW = "teacher few-shot"


class Runner(Protocol):
    """Runs (or resumes) one distillation and returns its metrics (``metrics.json``'s content)."""

    def __call__(self, cfg: RunConfig, *, resume: bool, on_event: EventFn | None) -> dict[str, Any]:
        """Run ``cfg``; ``resume`` continues the run committed in ``cfg.output.dir``."""
        ...


CompareEventFn = Callable[[str, str, dict[str, Any]], None]
"""Progress callback: (run name, stage, info)."""


@dataclass(frozen=True)
class PlannedRun:
    """One strategy x seed run of a comparison.

    Attributes:
        strategy: Strategy name.
        seed: Run seed.
        cfg: Its full config (strategy, seed, output folder and tracking filled in).
    """

    strategy: str
    seed: int
    cfg: RunConfig

    @property
    def name(self) -> str:
        """``<strategy>-s<seed>``: the run's folder and MLflow-facing name."""
        return run_name(self.strategy, self.seed)

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.cfg.output.dir)


# ---- parsing the command's lists ------------------------------------------------------------


def available_strategies() -> list[str]:
    """The strategy names registered in :data:`gold_ray.strategies.STRATEGIES`, in order."""
    from gold_ray.strategies import STRATEGIES

    return list(STRATEGIES)


def parse_strategies(value: str | Sequence[str]) -> list[str]:
    """Strategy names from ``"gold,zerogen"`` (or a list), checked against the registered ones.

    Raises:
        ConfigError: empty, repeated, or unknown names; the message lists the available ones.
    """
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if s.strip()]
    available = available_strategies()
    if not names:
        raise ConfigError(f"--strategies: no strategy given; available: {', '.join(available)}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"--strategies: unknown strategy {', '.join(map(repr, unknown))}; "
                          f"available: {', '.join(available)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--strategies: {', '.join(repeated)} given more than once")
    return names


def parse_seeds(value: str | int | Sequence[int]) -> list[int]:
    """Seeds from ``"3"`` (the seeds 0, 1, 2), ``"0,1"`` or ``"5,"`` (exactly those), or a list.

    Raises:
        ConfigError: not integers, negative, repeated, or a count below 1.
    """
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "," not in text:
                count = int(text)
                if count < 1:
                    raise ConfigError(f"--seeds: {text!r}: the number of seeds must be at least 1")
                return list(range(count))
            seeds = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds: {value!r} is neither a number of seeds (3) nor a seed list (0,1)") from None
    else:
        seeds = [int(s) for s in value]
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"--seeds: {value!r}: give at least one seed, none negative")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: {value!r} repeats a seed")
    return seeds


# ---- planning and running -------------------------------------------------------------------


def run_name(strategy: str, seed: int) -> str:
    """The name of a strategy x seed run: ``<strategy>-s<seed>``."""
    return f"{strategy}-s{seed}"


def run_config(base: RunConfig, strategy: str, seed: int, run_dir: str | Path, *,
               tracking_uri: str | None = None, parent_run_id: str | None = None) -> RunConfig:
    """``base`` with the strategy, seed, output folder and MLflow nesting of one run.

    Args:
        base: The comparison's config (teacher, student, budget, task: shared by every run).
        strategy: Strategy name.
        seed: Run seed.
        run_dir: The run directory.
        tracking_uri: The comparison's MLflow store (every run logs into the same one).
        parent_run_id: The comparison's MLflow parent run.

    Returns:
        A validated config.
    """
    data = base.model_dump(mode="json")
    data["seed"] = seed
    data["strategy"]["name"] = strategy
    data["output"] = {**data["output"], "dir": str(run_dir), "overwrite": False}
    if tracking_uri:
        data["tracking"]["tracking_uri"] = tracking_uri
    data["tracking"]["parent_run_id"] = parent_run_id
    return RunConfig.model_validate(data)


def plan_runs(base: RunConfig, strategies: Sequence[str], seeds: Sequence[int], out_dir: str | Path, *,
              tracking_uri: str | None = None, parent_run_id: str | None = None) -> list[PlannedRun]:
    """Every strategy x seed run of a comparison, strategy-major, in ``OUT/runs/<strategy>-s<seed>``."""
    runs_dir = Path(out_dir) / RUNS_DIR
    return [
        PlannedRun(s, seed, run_config(base, s, seed, runs_dir / run_name(s, seed),
                                       tracking_uri=tracking_uri, parent_run_id=parent_run_id))
        for s in strategies
        for seed in seeds
    ]


def _comparable(cfg: RunConfig) -> dict[str, str]:
    data = cfg.model_dump(mode="json")
    data.pop("output")
    data.pop("tracking")
    data.pop("baselines", None)  # the reference rows do not change what a run computes
    return flatten_params(data)


def check_run_config(cfg: RunConfig) -> None:
    """Refuse a run directory that holds a run of a different config.

    ``output`` and ``tracking`` may differ (a moved folder, another MLflow store); everything
    else (task, teacher, student, strategy, budget, resources, seed) must match, or the run would
    be counted under a setting it was not run with.

    Raises:
        RunDirError: names the folder and the differing keys.
    """
    path = Path(cfg.output.dir) / store.CONFIG_FILE
    if not path.is_file():
        return
    try:
        stored = _comparable(load_config(path))
    except ConfigError as err:
        raise RunDirError(f"{path}: the run there has a config this version cannot read ({err}); "
                          "use another output folder") from err
    planned = _comparable(cfg)
    diff = sorted(k for k in stored.keys() | planned.keys() if stored.get(k) != planned.get(k))
    if diff:
        shown = ", ".join(f"{k}: {stored.get(k)} -> {planned.get(k)}" for k in diff[:6])
        more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise RunDirError(f"{path.parent} holds a run with a different config ({shown}{more}); "
                          "use another output folder for a comparison with other settings")


def is_finished(run_dir: str | Path) -> bool:
    """Whether the run directory holds a finished run (its ``state.json`` says so)."""
    state = store.load_state(Path(run_dir))
    return bool(state and state.get("finished")) and (Path(run_dir) / "metrics.json").is_file()


def execute_run(cfg: RunConfig, runner: Runner, *, on_event: EventFn | None = None,
                check_config: bool = True) -> tuple[dict[str, Any], str]:
    """Run, resume or skip one run.

    Args:
        cfg: The run's config (``output.dir`` is its folder).
        runner: Executes a run (:func:`gold_ray.run.loop.distill_in_process` or ``actors.driver.run_on_ray``).
        on_event: Progress callback of the run.
        check_config: Refuse a folder holding a run of another config (:func:`check_run_config`).

    Returns:
        The run's metrics and how it went: ``skipped`` (finished before), ``resumed`` or ``new``.
    """
    run_dir = Path(cfg.output.dir)
    if check_config:
        check_run_config(cfg)
    if is_finished(run_dir):
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")), "skipped"
    resume = store.load_state(run_dir) is not None or (run_dir / store.CONFIG_FILE).exists()
    metrics = runner(cfg, resume=resume, on_event=on_event)
    return metrics, "resumed" if resume else "new"


# ---- the teacher as a classifier ------------------------------------------------------------


def eval_records(cfg: RunConfig, task: TaskSpec) -> list[dict[str, Any]]:
    """The evaluation records a run of ``cfg`` is scored on: the same lookup as the run's own
    (:func:`gold_ray.student.evaluation.load_task_eval`: ``task.eval_path``, the mirror file, or the
    task's ``eval.hf`` dataset, a seeded subset of ``task.eval_limit``); empty when there is none."""
    from gold_ray.student.evaluation import load_task_eval

    return load_task_eval(task, cfg.task).records


def teacher_fewshot(cfg: RunConfig, *, engine: TeacherEngine | None = None) -> dict[str, Any]:
    """The teacher itself as a few-shot classifier (the paper's "LLM" row) on the run's eval set.

    The same row a run computes at its end (:func:`gold_ray.run.baselines.teacher_fewshot`), from the
    same cache: a teacher already evaluated on these examples costs nothing here, and an engine is
    only built when the cache misses. The examples are the run's (``task.eval_limit``), at most
    ``baselines.teacher_fewshot_limit`` of them.

    Args:
        cfg: The config (task, teacher, ``task.eval_limit``, ``baselines``).
        engine: A ready engine (tests); built from ``cfg.teacher`` and closed afterwards when None.

    Returns:
        The task's metrics (``accuracy`` as a fraction, ``n``, ...), the settings they came from and
        ``cached``.

    Raises:
        ValueError: the task has no evaluation set.
    """
    from gold_ray.models import resolve_model
    from gold_ray.run.loop import resolve_prompt_style
    from gold_ray.student.evaluation import engine_answers, load_task_eval

    task = load_task(cfg.task.name)
    evalset = load_task_eval(task, cfg.task)
    records = evalset.records
    if not records:
        raise InputError(f"the teacher row needs a real evaluation set: {evalset.note}")
    teacher_path = None
    if engine is None and cfg.teacher.engine != "openai":
        teacher_path = resolve_model(cfg.teacher.model)
    style = resolve_prompt_style(cfg, teacher_path)
    built: list[TeacherEngine] = []

    def answer(prompts: list[Prompt]) -> list[Generation]:
        # The engine is built on the first call only: a cached row needs none.
        if not built:
            from gold_ray.teacher.engines import build_engine

            built.append(engine or build_engine(cfg.teacher, teacher_path or cfg.teacher.model, cfg.seed))
        return engine_answers(built[0])(prompts)

    try:
        row = baselines.teacher_fewshot(cfg, task, baselines.fewshot_records(records, cfg.baselines.teacher_fewshot_limit),
                                        style, answer, teacher_path=teacher_path)
    finally:
        if built and engine is None:
            built[0].close()
    return {**row, "eval_path": cfg.task.eval_path, "eval_limit": cfg.task.eval_limit}


# ---- scores of accepted data ----------------------------------------------------------------


def accepted_scores(run_dir: str | Path, cfg: RunConfig) -> np.ndarray:
    """OOD scores of a finished run's accepted data (every non-reject part) under its final student.

    Args:
        run_dir: A finished run directory.
        cfg: Its config (``strategy.score``, ``energy_temperature``, ``energy_mode``).

    Returns:
        One score per accepted record.
    """
    from gold_ray.student.model import load_student

    run_dir = Path(run_dir)
    state = store.load_state(run_dir) or {}
    parts = [run_dir / p for p in state.get("parts", []) if not Path(p).name.startswith("rejects")]
    records = store.read_parts(parts)
    if not records:
        return np.zeros(0)
    task = load_task(cfg.task.name)
    student = load_student(run_dir / "student", task)
    s = cfg.strategy
    return student.ood_scores(records, score=s.score, temperature=s.energy_temperature, mode=s.energy_mode)


def cached_scores(out_dir: Path, run: PlannedRun) -> np.ndarray:
    """:func:`accepted_scores` of a run, computed once and kept in ``OUT/scores/<run>.json``."""
    path = out_dir / SCORES_DIR / f"{run.name}.json"
    parts = (store.load_state(run.run_dir) or {}).get("parts", [])
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("parts") == parts and cached.get("score") == run.cfg.strategy.score:
            return np.asarray(cached["values"], dtype=float)
    values = accepted_scores(run.run_dir, run.cfg)
    store.atomic_write_json(path, {"score": run.cfg.strategy.score, "parts": parts,
                                   "values": [float(v) for v in values]})
    return values


# ---- the table --------------------------------------------------------------------------------


def primary_metric(task: TaskSpec) -> str:
    """The metric a comparison reports: ``accuracy`` (classification), ``numeric_match``
    (number answers) or ``exact_match`` (other text-to-text tasks)."""
    if task.is_classification:
        return "accuracy"
    return "numeric_match" if task.answer_type == "number" else "exact_match"


def metric_stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and spread of a metric over seeds.

    Args:
        values: One value per seed; None (a run without an evaluation) is left out.

    Returns:
        ``mean``, ``std`` (sample standard deviation, 0.0 for one value), ``seeds`` (values
        used), ``min`` and ``max``; mean, std, min and max are None when no value is left.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "seeds": 0, "min": None, "max": None}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "seeds": len(vals), "min": min(vals), "max": max(vals)}


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
"""The 0.975 quantile of Student's t with 1 to 30 degrees of freedom (a two-sided 95 % interval)."""

VERDICTS = ("ahead", "behind", "within seed noise", "one pair: no interval", "no pairs")
"""What :func:`paired_difference` can say, in words."""


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``).

    Tabulated up to 30; beyond, the Cornish-Fisher expansion around the normal quantile, within
    1e-3 of the exact value there (no SciPy needed).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(values: dict[str, float | None], reference: dict[str, float | None]) -> dict[str, Any]:
    """``values`` minus ``reference`` over the keys both have, with a 95 % interval and a verdict.

    The two are paired on their keys (seeds; (task, seed) pairs in the quality benchmark): runs of
    one seed share the seed demos drawn, the student's initialisation and the evaluation examples,
    and some seeds are luckier for every strategy. Differencing within a pair removes that shared
    part, so the interval measures how consistently one strategy beats the other rather than how
    much seeds move both; two separate means with their standard deviations would call most real
    differences seed noise at three seeds. The interval is the mean difference plus or minus
    ``t(0.975, n - 1) * sd / sqrt(n)`` over the n paired differences (Student's t: the spread is
    estimated from those few pairs).

    Args:
        values: Metric per key of the strategy judged (None or NaN: that key is left out).
        reference: Metric per key of the reference.

    Returns:
        ``n`` (pairs), ``pairs`` (their keys), ``mean``, ``std`` (of the differences), ``low`` and
        ``high`` (the 95 % interval; None with fewer than two pairs), and ``verdict``: ``ahead``
        (interval above 0), ``behind`` (below 0), ``within seed noise`` (it contains 0),
        ``one pair: no interval`` or ``no pairs``.
    """

    def usable(v: float | None) -> bool:
        return v is not None and math.isfinite(float(v))

    keys = [k for k in values if k in reference and usable(values[k]) and usable(reference[k])]
    diffs = [float(values[k]) - float(reference[k]) for k in keys]  # type: ignore[arg-type]
    out: dict[str, Any] = {"n": len(diffs), "pairs": [str(k) for k in keys], "mean": None, "std": None,
                           "low": None, "high": None}
    if not diffs:
        return {**out, "verdict": "no pairs"}
    mean = statistics.fmean(diffs)
    out["mean"] = mean
    if len(diffs) == 1:
        return {**out, "verdict": "one pair: no interval"}
    sd = statistics.stdev(diffs)
    half = t_quantile_975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    verdict = "ahead" if low > 0 else "behind" if high < 0 else "within seed noise"
    return {**out, "std": sd, "low": low, "high": high, "verdict": verdict}


def format_difference(d: dict[str, Any], *, points: bool = True) -> str:
    """A paired difference in one line: ``+2.1 points [+0.4, +3.8], 3 pairs: ahead``."""
    if d.get("mean") is None:
        return d.get("verdict", "no pairs")
    scale, unit = (100.0, " points") if points else (1.0, "")
    text = f"{d['mean'] * scale:+.1f}{unit}"
    if d.get("low") is not None:
        text += f" [{d['low'] * scale:+.1f}, {d['high'] * scale:+.1f}]"
    return f"{text}, {d['n']} pair{'s' if d['n'] != 1 else ''}: {d['verdict']}"


def run_row(run: PlannedRun, metrics: dict[str, Any], metric: str, status: str) -> dict[str, Any]:
    """One run's line of the table: its final metric, per-iteration curve and spend."""
    final = metrics.get("final", {})
    return {
        "strategy": run.strategy,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        metric: final.get(metric),
        "macro_f1": final.get("macro_f1"),
        "per_iteration": [m.get("train", {}).get(metric) for m in metrics.get("iterations", [])],
        "teacher_tokens": metrics.get("teacher_tokens"),
        # 0 where the engine did not count prompt tokens (or the run predates the count): unknown.
        "teacher_prompt_tokens": metrics.get("teacher_prompt_tokens") or None,
        "accepted": metrics.get("totals", {}).get("accepted"),
        "final_records": final.get("records"),
        "distinct_2": (final.get("diversity") or {}).get("distinct_2"),
        "nearest_overlap": (final.get("diversity") or {}).get("nearest_overlap"),
        "status": status,
        "mlflow_run_id": (metrics.get("mlflow") or {}).get("run_id"),
    }


def aggregate(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[str, Any]]:
    """Per strategy (in first-seen order): :func:`metric_stats` of ``metric`` over its rows, the
    per-seed values, and the means of the teacher output and prompt tokens, the final training records
    and the data's diversity (:func:`gold_ray.run.diversity.text_diversity`)."""
    out: dict[str, dict[str, Any]] = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        spend = {k: metric_stats([r.get(k) for r in mine])["mean"]
                 for k in ("teacher_tokens", "teacher_prompt_tokens", "final_records", "distinct_2", "nearest_overlap")}
        out[strategy] = {**metric_stats([r.get(metric) for r in mine]),
                         "per_seed": {str(r["seed"]): r.get(metric) for r in mine},
                         "teacher_tokens_mean": spend["teacher_tokens"],
                         "teacher_prompt_tokens_mean": spend["teacher_prompt_tokens"],
                         "final_records_mean": spend["final_records"],
                         "distinct_2_mean": spend["distinct_2"], "nearest_overlap_mean": spend["nearest_overlap"]}
    return out


def choose_reference(strategies: Sequence[str], reference: str | None = None) -> str:
    """The strategy every other one is paired with: ``reference``, else ``zerogen`` when compared, else
    the first.

    Raises:
        ConfigError: ``reference`` is not one of the compared strategies.
    """
    if reference:
        if reference not in strategies:
            raise ConfigError(f"--reference: {reference!r} is not among the compared strategies "
                              f"({', '.join(strategies)})")
        return reference
    return "zerogen" if "zerogen" in strategies else strategies[0]


def paired_to_reference(per_strategy: dict[str, dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """Each other strategy's :func:`paired_difference` to ``reference`` over the seeds both ran."""
    ref = per_strategy[reference]["per_seed"]
    return {s: paired_difference(v["per_seed"], ref) for s, v in per_strategy.items() if s != reference}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats with 4 decimals, None as an en dash."""

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _count(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def _diversity(s: dict[str, Any]) -> str | None:
    if s.get("distinct_2_mean") is None or s.get("nearest_overlap_mean") is None:
        return None
    return f"{s['distinct_2_mean']:.3f} / {s['nearest_overlap_mean']:.3f}"


def _mean_std(s: dict[str, Any]) -> str | None:
    if s.get("mean") is None:
        return None
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if s.get("seeds", 0) > 1 else f"{s['mean']:.4f} (one seed)"


def render_markdown(table: dict[str, Any]) -> str:
    """The comparison table (see :func:`compare`) as Markdown, with the settings above it and what
    the paired differences say below it."""
    metric = table["metric"]
    budget = table["budget"]
    tokens = f", at most {budget['max_teacher_tokens']} teacher output tokens" if budget["max_teacher_tokens"] else ""
    if budget.get("teacher_tokens"):
        tokens += f", {budget['teacher_tokens']} teacher output tokens per run (held equal)"
    reference = table.get("reference")
    head = (
        f"# Strategy comparison: {table['task']}\n\n"
        f"Teacher `{table['teacher']}`, student `{table['student']}`; {budget['samples']} teacher samples "
        f"per run (probes included){tokens}; seeds {', '.join(map(str, table['seeds']))}. "
        f"Final student {metric} on the task's evaluation set (n={table['eval_n']}), mean ± sample standard "
        f"deviation over seeds; each strategy's paired difference to `{reference}` over the seeds both ran, in "
        f"{metric} points, with its 95 % interval (t over the paired differences).\n\n"
    )
    rows = []
    paired = table.get("paired") or {}
    for strategy, s in table["strategies"].items():
        per_seed = ", ".join(f"{v:.4f}" if v is not None else "–" for v in s["per_seed"].values())
        versus = "reference" if strategy == reference else format_difference(paired.get(strategy, {}))
        rows.append([strategy, s["seeds"], _mean_std(s), per_seed, versus, _count(s["teacher_tokens_mean"]),
                     _count(s.get("teacher_prompt_tokens_mean")), _count(s["final_records_mean"]), _diversity(s)])
    majority = table.get("majority")
    if majority:
        rows.append([baselines.majority_name(majority), "–", majority["accuracy"], "–", "–", "–", "–", "–", "–"])
    fewshot = table.get("teacher_fewshot")
    if fewshot:
        n = f", n={fewshot['n']}" if fewshot.get("n") != table["eval_n"] else ""
        rows.append([f"{TEACHER_ROW} ({fewshot['prompt_style']}, {fewshot['demos']} demos{n})", "–",
                     fewshot.get(metric), "–", "–", "–", "–", "–", "–"])
    body = markdown_table([
        "strategy", "seeds", f"{metric} mean ± std", "per seed", f"vs {reference} (paired)",
        "teacher output tokens (mean)", "teacher prompt tokens (mean)", "final training records (mean)",
        "distinct word pairs / nearest overlap (mean)"], rows)
    lines = []
    for strategy, d in paired.items():
        if d["verdict"] in ("ahead", "behind"):
            lines.append(f"- `{strategy}` is {d['verdict']} of `{reference}`: {format_difference(d)}.")
        elif d["verdict"] == "within seed noise":
            lines.append(f"- `{strategy}` against `{reference}`: {format_difference(d)} (the interval contains 0: "
                         "no difference shown at these seeds).")
        elif d["verdict"] == "one pair: no interval":
            lines.append(f"- `{strategy}` against `{reference}`: {d['mean'] * 100:+.1f} points from one seed, "
                         "which gives no interval, so no verdict: run more seeds (--seeds 3).")
        else:
            lines.append(f"- `{strategy}` against `{reference}`: no seed both finished.")
    floors = [(f"the {baselines.majority_name(majority)}", majority["accuracy"])] if majority else []
    if fewshot and isinstance(fewshot.get(metric), int | float):
        floors.append(("the teacher as a few-shot classifier", fewshot[metric]))
    for strategy, s in table["strategies"].items():
        below = [f"{name} ({value:.4f})" for name, value in floors if s.get("mean") is not None and s["mean"] <= value]
        if below:
            lines.append(f"- FAILED: `{strategy}`'s mean {s['mean']:.4f} is not above {' and '.join(below)}: "
                         "its student is not worth deploying on this task, whatever it does against the other "
                         "strategies (the run's report says what to look at first).")
    spent = [s["teacher_tokens_mean"] for s in table["strategies"].values() if s["teacher_tokens_mean"]]
    if not budget.get("teacher_tokens") and len(spent) > 1 and max(spent) > 1.1 * min(spent):
        lines.append(f"- The strategies spent different teacher output tokens at the same samples "
                     f"({min(spent):.0f} to {max(spent):.0f} per run): hold them equal with "
                     "`--set budget.teacher_tokens=N` (and `budget.samples` high enough).")
    notes = lines + [str(n) for n in table.get("notes", [])]
    return head + body + ("\n" + "\n".join(f"{n}" if n.startswith("- ") else f"- {n}" for n in notes) + "\n"
                          if notes else "")


def comparison_plot(table: dict[str, Any], scores: dict[str, np.ndarray], path: Path) -> None:
    """The PNG of a comparison: metric per iteration per strategy, and score distributions."""
    from gold_ray.reporting.plots import new_figure, plot_metric_curves, plot_score_distributions, save_figure

    metric = table["metric"]
    curves: dict[str, list[list[float | None]]] = {}
    for row in table["runs"]:
        curves.setdefault(row["strategy"], []).append(row["per_iteration"])
    fewshot = table.get("teacher_fewshot") or {}
    panels = 2 if scores else 1
    fig, axes = new_figure(panels)
    plot_metric_curves(axes[0], curves, metric=metric, reference=fewshot.get(metric))
    if scores:
        plot_score_distributions(axes[1], scores, score_name=table["score"],
                                 title=f"{table['score']} of accepted data (final student of each run)")
    save_figure(fig, path)


# ---- the whole comparison ---------------------------------------------------------------------


def _start_parent(base: RunConfig, out_dir: Path, strategies: Sequence[str], seeds: Sequence[int]
                  ) -> MlflowTracker | None:
    if not base.tracking.enabled:
        return None
    tracker = MlflowTracker(base, out_dir)
    state_path = out_dir / STATE_JSON
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    known = state.get("mlflow_parent_run_id") if state.get("tracking_uri") == tracker.tracking_uri else None
    run_id = tracker.start(f"compare-{load_task(base.task.name).name}", resume_run_id=known)
    if run_id != known:
        tracker.log_params(base)
        tracker.log_params({"compare": {"strategies": ",".join(strategies), "seeds": ",".join(map(str, seeds))}})
        tracker.client.set_tag(run_id, "gold_ray.run.compare", "true")
    store.atomic_write_json(state_path, {"mlflow_parent_run_id": run_id, "tracking_uri": tracker.tracking_uri})
    return tracker


def compare(
    base: RunConfig,
    strategies: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    runner: Runner | None = None,
    with_teacher: bool = True,
    teacher_engine: TeacherEngine | None = None,
    on_event: CompareEventFn | None = None,
    echo: Callable[[str], None] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) a comparison and write its table, plot and MLflow runs (module docstring).

    Args:
        base: The shared config; its ``strategy.name``, ``seed`` and ``output.dir`` are replaced
            per run.
        strategies: Registered strategy names (see :func:`parse_strategies`).
        seeds: Seeds; every strategy runs with each.
        out_dir: The comparison's folder.
        runner: Executes one run; default :func:`distill_in_process`.
        with_teacher: Add the teacher-as-classifier row.
        teacher_engine: A ready engine for that row (tests); default built from ``base.teacher``.
        on_event: Progress of the runs: (run name, stage, info).
        echo: Receives one line per step (run skipped, resumed, finished; files written).
        reference: The strategy the others are paired with (:func:`choose_reference`: default
            ``zerogen`` when compared, else the first).

    Returns:
        The table (also written to ``compare.json``): ``task``, ``metric``, ``teacher``,
        ``student``, ``budget``, ``seeds``, ``eval_n``, ``strategies`` (per strategy
        :func:`aggregate`), ``reference``, ``paired`` (per other strategy :func:`paired_difference`
        to the reference), ``majority`` (:func:`gold_ray.run.baselines.majority_class` of the
        evaluation set), ``teacher_fewshot``, ``runs`` (:func:`run_row` each), ``score``,
        ``energy`` (per strategy count and median of the plotted scores), ``mlflow``, ``notes``.

    Raises:
        ConfigError: unknown strategies or bad seeds.
        RunDirError: ``out_dir`` holds a single run, or a run folder holds another config.
    """
    strategies = parse_strategies(strategies)
    seeds = parse_seeds(seeds)
    reference = choose_reference(strategies, reference)
    if not with_teacher:  # nor in the runs: --no-teacher-fewshot is asked to save that time
        base = base.model_copy(update={"baselines": base.baselines.model_copy(update={"teacher_fewshot": False})})
    out = Path(out_dir)
    say = echo or (lambda line: None)
    runner = runner or distill_in_process
    if (out / store.STATE_FILE).is_file():
        raise RunDirError(f"{out} holds a single run (state.json); give the comparison its own folder")
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(base.task.name)
    metric = primary_metric(task)
    for run in plan_runs(base, strategies, seeds, out):
        check_run_config(run.cfg)  # every folder before anything starts: a mismatch costs no time
    parent = _start_parent(base, out, strategies, seeds)
    uri = parent.tracking_uri if parent else None
    planned = plan_runs(base, strategies, seeds, out, tracking_uri=uri, parent_run_id=parent.run_id if parent else None)
    try:
        fewshot = None
        if with_teacher:
            # First, so that every run finds the row in the cache instead of computing it again.
            fewshot = teacher_fewshot(base, engine=teacher_engine)
            store.atomic_write_json(out / FEWSHOT_JSON, fewshot)
            how = "from the cache" if fewshot.get("cached") else f"computed in {fewshot.get('seconds')} s"
            value = fewshot.get(metric)
            shown = f"{value:.4f}" if isinstance(value, float) else value
            say(f"{TEACHER_ROW}: {metric}={shown} (n={fewshot.get('n')}, {how})")
        rows, scores = [], {}
        for run in planned:
            def forward(stage: str, info: dict[str, Any], name: str = run.name) -> None:
                if on_event is not None:
                    on_event(name, stage, info)

            metrics, status = execute_run(run.cfg, runner, on_event=forward, check_config=False)
            rows.append(run_row(run, metrics, metric, status))
            say(f"{run.name}: {status}, {metric}={metrics.get('final', {}).get(metric)}")
            values = cached_scores(out, run)
            scores[run.strategy] = np.concatenate([scores.get(run.strategy, np.zeros(0)), values])
        table = _table(base, task, metric, strategies, seeds, rows, fewshot, scores, parent, reference)
        _write_outputs(out, table, scores, parent)
    except BaseException:
        if parent is not None:
            parent.end("FAILED")
        raise
    if parent is not None:
        parent.end("FINISHED")
    say(f"table: {out / TABLE_MD} and {out / TABLE_JSON}; plot: {out / PLOT_PNG}")
    return table


def _table(base: RunConfig, task: TaskSpec, metric: str, strategies: Sequence[str], seeds: Sequence[int],
           rows: list[dict[str, Any]], fewshot: dict[str, Any] | None, scores: dict[str, np.ndarray],
           parent: MlflowTracker | None, reference: str | None = None) -> dict[str, Any]:
    records = eval_records(base, task)
    eval_n = len(records)
    strategy_stats = aggregate(rows, metric)
    ref = choose_reference(strategies, reference)
    notes = []
    empty = [s for s in strategies if not np.isfinite(scores.get(s, np.zeros(0))).any()]
    if empty:
        notes.append(f"no accepted data to score for: {', '.join(empty)} (left out of the score plot)")
    return {
        "task": task.name,
        "metric": metric,
        "teacher": base.teacher.model,
        "student": base.student.model,
        "budget": {"samples": base.budget.samples, "max_teacher_tokens": base.budget.max_teacher_tokens,
                   "teacher_tokens": base.budget.teacher_tokens, "iterations": base.strategy.iterations},
        "seeds": list(seeds),
        "eval_n": eval_n,
        "strategies": strategy_stats,
        "reference": ref,
        "paired": paired_to_reference(strategy_stats, ref),
        "majority": baselines.majority_class(task, records),
        "teacher_fewshot": fewshot,
        "runs": rows,
        "score": base.strategy.score,
        "energy": {s: {"n": int(np.isfinite(v).sum()), "median": float(np.nanmedian(v)) if np.isfinite(v).any() else None}
                   for s, v in scores.items()},
        "mlflow": {"tracking_uri": parent.tracking_uri, "parent_run_id": parent.run_id} if parent else None,
        "notes": notes,
    }


def _write_outputs(out: Path, table: dict[str, Any], scores: dict[str, np.ndarray],
                   parent: MlflowTracker | None) -> None:
    store.atomic_write_json(out / TABLE_JSON, table)
    store.atomic_write_bytes(out / TABLE_MD, render_markdown(table).encode("utf-8"))
    plotted = {s: v for s, v in scores.items() if np.isfinite(v).any()}
    comparison_plot(table, plotted, out / PLOT_PNG)
    if parent is None:
        return
    metric = table["metric"]
    values: dict[str, Any] = {}
    for strategy, s in table["strategies"].items():
        values[f"{strategy}.{metric}_mean"] = s["mean"]
        values[f"{strategy}.{metric}_std"] = s["std"]
    for strategy, d in table.get("paired", {}).items():
        for key in ("mean", "low", "high"):
            values[f"{strategy}.vs_{table['reference']}.{key}"] = d.get(key)
    if table.get("majority"):
        values["majority.accuracy"] = table["majority"]["accuracy"]
    if table.get("teacher_fewshot"):
        values[f"teacher_fewshot.{metric}"] = table["teacher_fewshot"].get(metric)
    parent.log_metrics(values)
    for name in (TABLE_JSON, TABLE_MD, PLOT_PNG):
        parent.log_artifact(out / name)
