"""The run directory: Parquet parts per iteration, the committed state, and the outputs.

Layout of a run directory::

    config.yaml              resolved RunConfig (no secrets: keys live in env vars)
    task.yaml                the task spec the run uses (a copy, for predict and report)
    state.json               last committed stage, counters, feedback pool, part list
    data/train-it000.parquet accepted training samples of iteration 0
    data/probe-it000.parquet accepted probe samples
    data/rejects-it000.parquet rejected samples with their reason
    data/pool-it000.parquet  texts the teacher wrote to label itself (LLKD); not training data
    data/pending-probe-it000.parquet probes written in the generate stage's pass, not yet scored
    first-pass.json          the state after iteration 0's teacher pass, for runs forked from this one
    checkpoints/it000/       student after iteration 0
    student/                 final student, HF format
    metrics.json, dataset_card.md, report.html, mlflow.db

Every file is written to a temporary name in the same folder and renamed into place, so a crash
never leaves a half-written part under a data name, and ``state.json`` only lists parts that exist.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gold_ray.errors import UserError, parse_file
from gold_ray.run.tasks import TaskSpec

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
TASK_FILE = "task.yaml"
FIRST_PASS_FILE = "first-pass.json"
"""The state as committed with iteration 0's generate stage, kept for runs that start from this
one's first teacher pass (``output.fork_from``, :mod:`gold_ray.run.fork`)."""

PENDING_PROBES = "pending-probe"
"""Part of the probes written in the generate stage's teacher pass and not yet scored: not
training data until the probe stage writes them as ``probe``."""


def record_schema(task: TaskSpec) -> pa.Schema:
    """The Parquet schema of a record of ``task`` (same for train, probe and rejects parts)."""
    text_cols = [*task.field_names, task.target_key]
    return pa.schema(
        [
            ("id", pa.string()),
            ("iteration", pa.int64()),
            ("kind", pa.string()),
            *[(c, pa.string()) for c in text_cols],
            ("requested_label", pa.string()),
            ("raw_text", pa.string()),
            ("reject_reason", pa.string()),
            ("reject_detail", pa.string()),
            ("score", pa.float64()),
            ("output_tokens", pa.int64()),
            ("style", pa.string()),
            ("confidence", pa.float64()),
            ("option_logprobs", pa.string()),
        ]
    )


def record_id(iteration: int, kind: str, index: int) -> str:
    """The id of the ``index``-th sample of one stage: ``it003-probe-00012``."""
    return f"it{iteration:03d}-{kind}-{index:05d}"


def make_record(
    task: TaskSpec,
    *,
    iteration: int,
    kind: str,
    index: int,
    requested_label: str | None,
    raw_text: str,
    reject_reason: str | None,
    reject_detail: str = "",
    fields: dict[str, Any] | None = None,
    score: float = float("nan"),
    output_tokens: int = 0,
    style: str | None = None,
    confidence: float = float("nan"),
    option_logprobs: str | None = None,
) -> dict[str, Any]:
    """One sample row in the :func:`record_schema` layout; both runtimes build every row here.

    A rejected row keeps its raw text and reason but no fields and no score. A classification
    sample the teacher wrote (not one it labelled) takes the label it was asked for.

    Args:
        task: The task.
        iteration: Iteration of the stage.
        kind: ``train``, ``probe`` or ``classify``.
        index: The prompt's position in the stage.
        requested_label: The label the prompt asked for.
        raw_text: The teacher's answer ("" when the call failed).
        reject_reason: Why the row is rejected, or None when accepted.
        reject_detail: More on the reason (the error text, the duplicate …).
        fields: The parsed input fields (and target), for an accepted row.
        score: The student's OOD score, when scored.
        output_tokens: Tokens the teacher wrote.
        style: The prompt's style.
        confidence: The teacher's label confidence (``classify`` rows).
        option_logprobs: The teacher's label scores as JSON (``classify`` rows).
    """
    rec: dict[str, Any] = {
        "id": record_id(iteration, kind, index),
        "iteration": iteration,
        "kind": kind,
        "requested_label": requested_label or None,
        "raw_text": raw_text,
        "reject_reason": reject_reason or None,
        "reject_detail": reject_detail or "",
        "score": float(score) if reject_reason is None else float("nan"),
        "output_tokens": int(output_tokens),
        "style": style or None,
        "confidence": float(confidence),
        "option_logprobs": option_logprobs or None,
    }
    if reject_reason is None and fields is not None:
        rec.update({k: (v if v != "" else None) for k, v in fields.items()})
        if task.is_classification and kind != "classify":
            rec["label"] = requested_label
    return rec


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode("utf-8"))


def write_part(path: Path, task: TaskSpec, records: Iterable[dict[str, Any]], writer=pq.write_table) -> Path:
    """Write records to a Parquet part atomically; ``writer`` is injectable for fault tests.

    Returns:
        ``path``, which exists only if the whole write succeeded.
    """
    schema = record_schema(task)
    rows = [{name: _cell(rec.get(name), schema.field(name).type) for name in schema.names} for rec in records]
    table = pa.Table.from_pylist(rows, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(table, tmp)
        # On disk before the rename, as state.json is: a state committed after a power loss must
        # not list a part that comes back empty.
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete the hidden temporary part files a killed writer left in ``run_dir/data``.

    They are never data (no reader globs hidden ``.tmp`` names, and no state lists them); a
    reopened run clears them so they do not pile up.

    Returns:
        The files removed.
    """
    removed = []
    for tmp in (run_dir / "data").glob(".*.parquet.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _cell(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(typ):
        return str(value)
    if pa.types.is_integer(typ):
        return int(value)
    if pa.types.is_floating(typ):
        return float(value)
    return value


def read_parts(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """All records of the given parts, in order."""
    out: list[dict[str, Any]] = []
    for p in paths:
        out.extend(pq.read_table(p).to_pylist())
    return out


def part_path(run_dir: Path, kind: str, iteration: int) -> Path:
    """Where the ``kind`` part (train, probe, rejects) of an iteration lives."""
    return run_dir / "data" / f"{kind}-it{iteration:03d}.parquet"


class StateFileError(UserError, ValueError):
    """A state file that cannot be trusted: not JSON, or naming paths outside its run directory."""


def path_inside(run_dir: Path, rel: str, what: str) -> Path:
    """``run_dir / rel``, refused unless ``rel`` is relative and stays inside ``run_dir``.

    The state file is read back on resume and its paths are read, overwritten and deleted (an
    old checkpoint is removed when a new one is committed), so an edited or hostile state file
    must not reach anything outside the run.

    Raises:
        StateFileError: ``rel`` is absolute or climbs out of ``run_dir``; the message names ``what``.
    """
    root = run_dir.resolve()
    target = (root / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(root):
        raise StateFileError(f"{run_dir / STATE_FILE}: {what} {rel!r} is outside the run directory")
    return run_dir / rel


STATE_FIELDS: tuple[tuple[str, tuple[type, ...], str], ...] = (
    ("iteration", (int,), "an iteration number"),
    ("stage", (str, type(None)), "a stage name or null"),
    ("finished", (bool,), "true or false"),
    ("feedback", (list,), "a list of records"),
    ("dedup", (list,), "a list"),
    ("parts", (list,), "a list of part paths"),
    ("iterations", (list,), "a list of per-iteration metrics"),
    ("pending_probes", (dict, type(None)), "an object or null"),
)
"""The state's fields the loop reads, with the types it reads them as (``pending_probes`` may be absent)."""


def load_state(run_dir: Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    """The committed state of a run (or the one it kept as ``name``, e.g. :data:`FIRST_PASS_FILE`),
    or None for a fresh directory.

    Raises:
        StateFileError: The file is not JSON, a field of :data:`STATE_FIELDS` has another type (the
            message names it), or a part or checkpoint path leaves the run directory.
    """
    path = run_dir / name
    if not path.is_file():
        return None
    state = parse_file(path, "json", lambda err: StateFileError(f"{path}: not a gold-ray state file ({err})"))
    if not isinstance(state, dict):
        raise StateFileError(f"{path}: not a gold-ray state file (a JSON object is expected)")
    for key, kinds, what in STATE_FIELDS:
        if not isinstance(state.get(key), kinds) or isinstance(state.get(key), bool) and bool not in kinds:
            raise StateFileError(f"{path}: {key} must be {what}, got {state.get(key)!r:.80}")
    for i, part in enumerate(state.get("parts") or []):
        path_inside(run_dir, str(part), f"parts[{i}]")
    if state.get("checkpoint"):
        path_inside(run_dir, str(state["checkpoint"]), "checkpoint")
    return state


def commit_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Commit the run state atomically, after checking every listed part exists."""
    missing = [p for p in state.get("parts", []) if not (run_dir / p).is_file()]
    if missing:
        raise RuntimeError(f"refusing to commit a state that lists missing parts: {missing}")
    atomic_write_json(run_dir / STATE_FILE, state)


def _diversity_line(diversity: dict[str, Any] | None) -> str:
    """The card's diversity line (:func:`gold_ray.run.diversity.text_diversity`), or nothing before the final stage."""
    if not diversity or diversity.get("distinct_2") is None:
        return ""
    near = diversity.get("nearest_overlap")
    nearest = "" if near is None else (f", nearest other text shares {near:.0%} of a text's word pairs on average"
                                       f" ({diversity.get('near_copies', 0):.1%} share half or more)")
    return (f"\n- Diversity of {diversity['texts']} sampled texts: {diversity['distinct_2']:.0%} of word pairs"
            f" distinct{nearest}")


def dataset_card(task: TaskSpec, metrics: dict[str, Any], parts: list[str]) -> str:
    """A Markdown dataset card for the generated data of a run."""
    totals = metrics.get("totals", {})
    rejected = {k[len("rejected_"):]: v for k, v in totals.items() if k.startswith("rejected_")}
    files = "\n".join(f"- `{p}`" for p in parts)
    labels = ", ".join(task.label_names) if task.is_classification else f"target `{task.target_key}`"
    return f"""# Synthetic {task.name} data generated by gold-ray

Generated by the teacher `{metrics.get('teacher')}` with the `{metrics.get('strategy')}` strategy
(seed {metrics.get('seed')}) for the task: {task.description}

- Type: {task.type}; fields: {', '.join(task.field_names)}; labels: {labels}
- Accepted samples (train and probe parts): {totals.get('accepted', 0)}
- Rejected samples by reason: {rejected or 'none'}
- Teacher output tokens: {metrics.get('teacher_tokens')}{_diversity_line(metrics.get('final', {}).get('diversity'))}

Every sample was written by a language model and may be wrong, biased or noisy; rejected samples
are kept in the `rejects-*` parts with their reason. Load the data with::

    from datasets import load_dataset
    ds = load_dataset("parquet", data_files={{"train": "data/train-*.parquet", "probe": "data/probe-*.parquet"}})

## Files

{files}
"""
