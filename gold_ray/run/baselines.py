"""The references a student is judged against, on the same evaluation examples as the student.

- :func:`majority_class`: predict the most frequent label of the evaluation examples for every
  example (classification tasks only). A student below it has learned nothing usable.
- :func:`teacher_fewshot`: the teacher itself as a few-shot classifier (the paper's "LLM" row):
  the task's seed demos in the teacher's prompt style (:func:`gold_ray.teacher.prompts.render_classify_prompt`),
  each label's verbalizer scored by the teacher (:mod:`gold_ray.student.evaluation`). Distilling is
  worth it when the student beats this at a fraction of the cost.

The teacher row costs one forward pass per example and label (SST-2's 872 examples took 325 s on 2
CPUs with the embedded teacher), so its result is cached as a small JSON file per teacher, task,
evaluation examples, prompt style and demos, under :func:`cache_root` (``$GOLD_RAY_CACHE/baselines``
unless ``$GOLD_RAY_BASELINE_CACHE`` names another folder). The key is a hash of what decides the
answer: the teacher (its reference, engine and dtype, and for a local model its files' names,
sizes and times), every rendered prompt and every gold target. Another eval subset, prompt style or
demo set therefore never reuses a stale result, and the same one is reused by every run and by
``gold-ray compare``.

The teacher is reached through an :data:`~gold_ray.student.evaluation.AnswerFn`: a run passes its
runtime's teacher (:meth:`gold_ray.run.runtime.Runtime.answer`: the engine in process, the Serve
deployment on Ray); ``gold-ray compare`` and the quality benchmark pass an engine built here, and
only when the cache misses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gold_ray.config import RunConfig
from gold_ray.run import store
from gold_ray.run.tasks import TaskSpec
from gold_ray.student.evaluation import AnswerFn, evaluate_teacher_fewshot, fewshot_prompts, seeded_subset

BASELINE_CACHE_ENV = "GOLD_RAY_BASELINE_CACHE"
"""Environment variable naming the folder of cached teacher rows (default ``cache_dir()/baselines``)."""

CACHE_VERSION = 1
"""Part of every cache key: bumped when the way the teacher row is computed changes."""


def cache_root() -> Path:
    """The folder of cached teacher rows: ``$GOLD_RAY_BASELINE_CACHE``, else ``cache_dir()/baselines``."""
    from gold_ray.models import cache_dir

    named = os.environ.get(BASELINE_CACHE_ENV)
    return Path(named).expanduser() if named else cache_dir() / "baselines"


def majority_class(task: TaskSpec, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The majority-class row: the most frequent label of ``records``, predicted for all of them.

    Args:
        task: The task (classification; text-to-text tasks have no majority class).
        records: Labelled evaluation records.

    Returns:
        ``{"label", "accuracy", "n"}`` (ties go to the label first in the task's order, and the
        labels it is tied with are listed under ``tied``), or None for a text-to-text task or no
        records.
    """
    if not task.is_classification or not records:
        return None
    counts = Counter(str(r.get("label")) for r in records)
    label = max(task.label_names, key=lambda name: counts.get(name, 0))
    row = {"label": label, "accuracy": counts.get(label, 0) / len(records), "n": len(records)}
    tied = [name for name in task.label_names if name != label and counts.get(name, 0) == counts.get(label, 0)]
    return {**row, "tied": tied} if tied else row


def majority_name(majority: dict[str, Any]) -> str:
    """The majority-class row's name: ``majority class (positive)``, or with the labels it is tied with."""
    tied = majority.get("tied")
    return f"majority class ({majority['label']}" + (f", tied with {', '.join(tied)})" if tied else ")")


def fewshot_records(records: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The examples the teacher row is computed on: a seeded subset of at most ``limit`` of ``records``."""
    return list(records) if limit is None else seeded_subset(records, limit)


def _teacher_fingerprint(cfg: RunConfig, teacher_path: str | None) -> dict[str, Any]:
    """What identifies the teacher: its reference and engine, and a local model's files."""
    t = cfg.teacher
    out: dict[str, Any] = {"model": t.model, "engine": t.engine, "dtype": t.dtype}
    if t.engine == "openai":
        out["base_url"] = t.base_url
    if teacher_path and Path(teacher_path).is_dir():
        # A model retrained into the same folder has other files: its cached row is then stale.
        out["files"] = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                              for p in Path(teacher_path).iterdir() if p.is_file())
    return out


def _prompt_data(prompt: Any) -> dict[str, Any]:
    data = dataclasses.asdict(prompt)
    data["meta"] = {k: v for k, v in data.get("meta", {}).items() if k != "uid"}
    return data


def cache_key(cfg: RunConfig, task: TaskSpec, prompts: Sequence[Any], records: Sequence[dict[str, Any]],
              teacher_path: str | None) -> str:
    """The cache key of a teacher row: a hash of the teacher, every prompt and every gold target."""
    payload = {
        "version": CACHE_VERSION,
        "teacher": _teacher_fingerprint(cfg, teacher_path),
        "task": task.name,
        "prompts": [_prompt_data(p) for p in prompts],
        "gold": [str(r.get(task.target_key)) for r in records],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def teacher_fewshot(
    cfg: RunConfig,
    task: TaskSpec,
    records: Sequence[dict[str, Any]],
    prompt_style: str,
    answer: AnswerFn,
    *,
    teacher_path: str | None = None,
    use_cache: bool = True,
) -> dict[str, Any]:
    """The teacher as a few-shot classifier on ``records``, read from the cache or computed and cached.

    Args:
        cfg: The config (``teacher``, ``strategy.max_demo_chars``).
        task: The task; its seed demos are the few-shot examples.
        records: The labelled examples (already bounded by the caller, see :func:`fewshot_records`).
        prompt_style: ``chat`` or ``continuation``, as the run prompts the teacher.
        answer: Answers a batch of prompts; only called when the cache misses.
        teacher_path: The resolved teacher model folder (part of the key); None for a remote one.
        use_cache: Read and write the cache.

    Returns:
        The task's metrics (``accuracy`` as a fraction, ``n``, ``unanswered``, ...), the settings
        (``task``, ``teacher``, ``engine``, ``prompt_style``, ``demos``), ``seconds`` it took when
        computed, ``key`` and ``cached`` (whether it came from the cache).
    """
    demos = list(task.seed_demos)
    prompts = fewshot_prompts(task, records, prompt_style=prompt_style, max_demo_chars=cfg.strategy.max_demo_chars)
    key = cache_key(cfg, task, prompts, records, teacher_path)
    path = cache_root() / f"teacher-fewshot-{key}.json"
    if use_cache and path.is_file():
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "cached": True}
        except (OSError, json.JSONDecodeError):
            pass  # an unreadable cache file is computed again and replaced
    t0 = time.perf_counter()
    by_prompt = dict(zip((id(r) for r in records), prompts, strict=True))
    metrics = evaluate_teacher_fewshot(answer, task, records, lambda r: by_prompt[id(r)])
    row = {**metrics, "task": task.name, "teacher": cfg.teacher.model, "engine": cfg.teacher.engine,
           "prompt_style": prompt_style, "demos": len(demos), "seconds": round(time.perf_counter() - t0, 1),
           "key": key}
    if use_cache:
        store.atomic_write_json(path, row)
    return {**row, "cached": False}


def student_metric(final: dict[str, Any]) -> tuple[str, float] | None:
    """The final student's headline figure beside the references: ``(metric, value)``.

    The real evaluation set's ``accuracy`` (or ``numeric_match``/``exact_match``), else the same on
    the synthetic test split (``synthetic_*``); None when the run has neither.
    """
    for prefix in ("", "synthetic_"):
        for name in ("accuracy", "numeric_match", "exact_match"):
            value = final.get(prefix + name)
            if isinstance(value, int | float):
                return name, float(value)
    return None


def reference_rows(final: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """The student and its references as ``(name, value, note)`` rows, for the summary and the report.

    Args:
        final: A finished run's ``metrics["final"]`` (with ``baselines``).

    Returns:
        The final student, the teacher as a few-shot classifier and the majority class, each with
        the primary metric on the same examples (None where it is missing, the note saying why);
        empty when the run recorded no baselines.
    """
    base = final.get("baselines") or {}
    if not base:
        return []
    student = student_metric(final)
    metric = student[0] if student else "accuracy"
    rows: list[tuple[str, float | None, str]] = [("final student", student[1] if student else None,
                                                  f"{base.get('n')} examples")]
    teacher = base.get("teacher_fewshot")
    if teacher is None:
        rows.append(("teacher as few-shot classifier", None, base.get("teacher_fewshot_note", "not computed")))
    elif teacher.get("error"):
        rows.append(("teacher as few-shot classifier", None, f"failed: {teacher['error']}"))
    else:
        note = f"{teacher.get('n')} examples, {teacher.get('prompt_style')}, {teacher.get('demos')} demos"
        note += ", cached" if teacher.get("cached") else f", {teacher.get('seconds')} s"
        rows.append(("teacher as few-shot classifier", teacher.get(metric), note))
    majority = base.get("majority")
    if majority:
        rows.append((majority_name(majority), majority["accuracy"], f"{majority['n']} examples"))
    return rows


def _standard_error(value: float, n: Any) -> float | None:
    """The standard error of an accuracy-like share ``value`` measured on ``n`` examples."""
    return math.sqrt(value * (1 - value) / n) if isinstance(n, int) and n > 0 and 0 <= value <= 1 else None


FITS_TEACHER_MARGIN = 0.10
"""A final student this far above its synthetic split's majority share has learned the teacher's samples."""


def synthetic_fit(final: dict[str, Any]) -> tuple[float | None, float | None]:
    """The final student's accuracy on the synthetic validation split its recipe was chosen on, and
    that split's majority share: ``(val_accuracy, val_majority)``, None where the run has none."""
    chosen = next((r for r in final.get("recipes") or [] if r.get("recipe") == final.get("recipe")), {})
    fitted, majority = chosen.get("val_accuracy"), final.get("val_majority")
    return (fitted if isinstance(fitted, int | float) else None,
            majority if isinstance(majority, int | float) else None)


def reference_verdict(final: dict[str, Any]) -> str | None:
    """One plain sentence on the final student against its references, for the run's last lines and report.

    A student not above the majority class has learned nothing usable, and one not above the teacher
    as a few-shot classifier is not worth deploying in its place: both are said as failures, with
    what the run's own numbers tell about why (the student fitting the teacher's samples but not the
    real set means the samples do not carry the task as the real data does). A lead within two
    standard errors of the evaluation set is said to be one.

    Args:
        final: A finished run's ``metrics["final"]`` (with ``baselines``).

    Returns:
        The sentence, starting with ``FAILED:`` for a student below a reference; None when the run
        recorded no references.
    """
    base = final.get("baselines") or {}
    student = student_metric(final)
    if not base or student is None:
        return None
    metric, value = student
    refs = []
    if (teacher := base.get("teacher_fewshot")) and isinstance(teacher.get(metric), int | float):
        refs.append(("the teacher as a few-shot classifier", float(teacher[metric])))
    if (majority := base.get("majority")) and isinstance(majority.get("accuracy"), int | float):
        refs.append((f"the {majority_name(majority)}", float(majority["accuracy"])))
    if not refs:
        return None
    below = [(name, ref) for name, ref in refs if value <= ref]
    if below:
        shown = " and ".join(f"{name} ({ref:.4f})" for name, ref in below)
        text = f"FAILED: the final student's {metric} {value:.4f} is not above {shown}."
        fitted, its_majority = synthetic_fit(final)
        if base.get("on") == "eval set" and fitted is not None and its_majority is not None:
            if fitted >= its_majority + FITS_TEACHER_MARGIN:
                text += (f" It fits the teacher's samples ({fitted:.4f} on their held-out split, majority "
                         f"{its_majority:.4f}) but not the real set: the teacher's samples do not carry the "
                         "task's labels as the real data does (a stronger teacher.model, clearer label "
                         "descriptions and seed demos in the task file).")
            else:
                text += (f" It did not learn even the teacher's samples ({fitted:.4f} on their held-out split, "
                         f"majority {its_majority:.4f}): more samples (budget.samples) or a stronger teacher.model.")
        return text
    margin_name, margin_ref = max(refs, key=lambda r: r[1])
    lead = value - margin_ref
    text = f"The final student's {metric} {value:.4f} is above {' and '.join(name for name, _ in refs)}"
    text += f", {100 * lead:+.1f} points over {margin_name}"
    se = _standard_error(value, base.get("n"))
    if se is not None and lead < 2 * se:
        text += f", within two standard errors ({100 * se:.1f} points each) of this set: not a sure lead"
    return text + "."
