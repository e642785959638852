"""Evaluation of students (and of the teacher as a few-shot classifier) on real labelled data.

Evaluation files are JSON Lines: one record per line with the task's input fields and its target
(``label`` for classification tasks, the target field such as ``answer`` otherwise). Numbers in a
target field (SVAMP's ``answer``) are turned into strings so every target is text.

Metrics take lists of strings. :func:`macro_f1` follows the usual convention that a label with no
prediction and no gold example, or no true positive, has F1 0.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gold_ray.config import ConfigError
from gold_ray.errors import InputError, MissingFileError
from gold_ray.run.tasks import DATA_DIR_ENV, HfEvalSource, TaskFileError, TaskSpec, resolve_data_path
from gold_ray.types import Generation, Prompt, SamplingParams, TeacherEngine

if TYPE_CHECKING:
    from gold_ray.config import TaskConfig
    from gold_ray.student.model import Student

logger = logging.getLogger(__name__)

NUMERIC_TOLERANCE = 1e-6
"""Two answers match numerically when their first numbers differ by at most this much."""

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a JSONL file."""
    p = Path(path)
    seen = False
    try:
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{p}:{lineno}: not valid JSON: {err.msg}") from None
                if not isinstance(record, dict):
                    raise InputError(f"{p}:{lineno}: expected a JSON object, got {type(record).__name__}")
                seen = True
                yield lineno, record
    except FileNotFoundError:
        raise MissingFileError(f"{p}: no such file") from None
    except OSError as err:  # a folder, no permission
        raise InputError(f"{p}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not seen:
        raise InputError(f"{p}: no records (the file is empty or blank)")


def read_jsonl_numbered(path: str | os.PathLike[str]) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of a JSON Lines file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: as :func:`read_jsonl` (the message names the file and line).
    """
    return list(_iter_jsonl(path))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """All records of a JSON Lines file; blank lines are skipped.

    Args:
        path: The file.

    Returns:
        One dict per non-blank line.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not a JSON object (the message names the file and line), the file
            is not UTF-8, or it holds no record.
    """
    return [record for _, record in _iter_jsonl(path)]


def _target_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def load_eval_records(
    task: TaskSpec,
    path: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    *,
    seed: int | None = 0,
) -> list[dict]:
    """The checked evaluation records of ``task``.

    Args:
        task: The task; its input fields and target key must be in every record.
        path: A JSONL file; default: the task's evaluation file (``task.eval_path()``).
        limit: Keep at most this many records.
        seed: With ``limit``, keep a random subset drawn with this seed (in file order), since
            evaluation files are often sorted by label; None keeps the first ``limit`` records.

    Returns:
        Records with the input fields as strings, the target as a string, and any extra keys.

    Raises:
        ValueError: a record misses a field or has an unknown label (the message names the line),
            or the task has no evaluation file.
    """
    if path is None:
        path = task.eval_path()
        if path is None:
            raise InputError(f"task {task.name!r} names no evaluation file (task eval.path)")
    label_names = set(task.label_names)
    records, problems = [], []
    for lineno, raw in _iter_jsonl(path):
        missing = next((n for n in (*task.field_names, task.target_key) if raw.get(n) is None), None)
        if missing is not None:
            problems.append((lineno, f"missing field {missing!r}"))
            continue
        record = dict(raw)
        for name in task.field_names:
            record[name] = str(raw[name])
        record[task.target_key] = _target_text(raw[task.target_key])
        if task.is_classification and record["label"] not in label_names:
            problems.append((lineno, f"label {record['label']!r} is not one of {task.label_names}"))
            continue
        records.append(record)
    if problems:
        raise InputError(lines_with_problems(path, problems, f"task {task.name!r}"))
    if limit is not None and limit < len(records):
        return records[:limit] if seed is None else seeded_subset(records, limit, seed)
    return records


def lines_with_problems(path: str | os.PathLike[str], problems: Sequence[tuple[int, str]], context: str,
                        shown: int = 10) -> str:
    """One message for every bad line of a file: the first in full, then where the others are.

    A file written by a script is usually wrong on many lines in the same way; naming them all at
    once saves a user fixing it line by line.

    Args:
        path: The file.
        problems: ``(line number, what is wrong)`` in file order; at least one.
        context: What the file is for (``task 'x'``), in parentheses after the first problem.
        shown: How many more line numbers to list.
    """
    lineno, what = problems[0]
    message = f"{path}:{lineno}: {what} ({context})"
    rest = problems[1:]
    if rest:
        listed = ", ".join(str(n) for n, _ in rest[:shown]) + (", ..." if len(rest) > shown else "")
        message += f"; {len(rest)} more line{'s' if len(rest) > 1 else ''} with problems: {listed}"
    return message


def seeded_subset(records: Sequence[dict], limit: int, seed: int = 0) -> list[dict]:
    """At most ``limit`` of ``records``, drawn without replacement with ``seed``, in their original order.

    Args:
        records: The records to draw from.
        limit: How many to keep (all of them when there are no more).
        seed: The draw's seed.

    Returns:
        The kept records, in the order they had in ``records``.
    """
    if limit >= len(records):
        return list(records)
    keep = np.sort(np.random.default_rng(seed).choice(len(records), size=limit, replace=False))
    return [records[i] for i in keep]


# ----- a task's evaluation set, wherever it lives ------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """A run's real evaluation records and where they came from.

    Attributes:
        records: Checked records (see :func:`load_eval_records`); empty when none could be loaded.
        source: ``file:<path>`` (a file the user named), ``mirror:<path>`` (the task's file in the
            local data mirror), ``hf:<path>[/<name>]:<split>`` (a ``datasets`` dataset) or ``none``.
        note: One line for people: what the run evaluates on, or why it has no real evaluation set.
        file: The local file the records were read from, or None.
    """

    records: list[dict] = field(default_factory=list)
    source: str = "none"
    note: str = ""
    file: Path | None = None


def _local_eval_file(task: TaskSpec, task_cfg: TaskConfig) -> tuple[Path | None, str, str]:
    """``(file, kind, why)``: the local evaluation file, ``file`` or ``mirror``, and why there is none."""
    if task_cfg.eval_path:
        try:
            return resolve_data_path(task_cfg.eval_path, task_cfg.data_dir).absolute(), "file", ""
        except FileNotFoundError as err:
            raise ConfigError(f"task.eval_path: {err}") from None
    raw = task.eval.path if task.eval else None
    if raw is None:
        return None, "", "the task names no evaluation file"
    if Path(os.path.expanduser(raw)).is_absolute():
        return Path(os.path.expanduser(raw)), "file", ""
    base = task_cfg.data_dir or os.environ.get(DATA_DIR_ENV)
    if not base:
        why = f"no data folder is set (${DATA_DIR_ENV} or task.data_dir) to hold {raw!r}"
    else:
        candidate = (Path(os.path.expanduser(base)) / raw).absolute()
        if candidate.is_file():
            return candidate, "mirror", ""
        why = f"the data folder {str(base)!r} holds no {raw!r}"
    there = task.beside_file(raw)
    if there is not None and task.eval is not None and task.eval.hf is None:
        # A user's own task named this file and nothing can stand in for it: a typo in the name
        # must not become a run scored on synthetic data.
        raise TaskFileError(f"{task.file}: eval.path: {raw!r} is not beside the task file "
                            f"({str(there)!r} does not exist), and {why}")
    # A mirror may hold only some tasks: the task's dataset can still stand in for the missing file.
    return None, "", why


def task_eval_file(task: TaskSpec, task_cfg: TaskConfig) -> Path | None:
    """The local file :func:`load_task_eval` reads, found without reading it; None for any other source.

    Strategies that read real data of their own refuse this file, so they never learn from the
    test set.

    Args:
        task: The task.
        task_cfg: The run's ``task`` config section (``eval_path``, ``data_dir``).

    Returns:
        ``task.eval_path``, an absolute ``eval.path`` of the task, or the task's file in the data
        mirror when the mirror holds it; else None.

    Raises:
        ConfigError: ``task.eval_path`` is relative and no data folder is set.
    """
    return _local_eval_file(task, task_cfg)[0]


def load_task_eval(task: TaskSpec, task_cfg: TaskConfig, *, seed: int = 0) -> EvalSet:
    """A run's real evaluation set, from the first source that has it.

    In order: ``task.eval_path`` from the config; an absolute ``eval.path`` of the task; the
    task's relative ``eval.path`` in the local data mirror (``task.data_dir`` or
    ``$GOLD_RAY_DATA``), when set and holding it; the task's ``eval.hf`` dataset through
    ``datasets.load_dataset``, which reads its cache and respects ``HF_DATASETS_OFFLINE=1``.
    When none of these has the set, the result has no records, source ``none`` and a note that
    the run evaluates on a synthetic hold-out, and why. ``task_cfg.eval_limit`` keeps a seeded
    subset of any source.

    Args:
        task: The task.
        task_cfg: The run's ``task`` config section (``eval_path``, ``data_dir``, ``eval_limit``).
        seed: Seed of the ``eval_limit`` subset.

    Returns:
        The :class:`EvalSet`.

    Raises:
        ConfigError: a file named by ``task.eval_path`` cannot be read or does not check.
        TaskFileError: a file named by the task's absolute ``eval.path`` cannot be read or does
            not check, or the ``eval.hf`` dataset was reached but does not fit the task (the
            message names the field).
        InputError: the mirror file does not check (the message names the file and line).
        TaskFileError: ``eval.hf`` is malformed: files it names on this machine cannot be read, the
            split or configuration does not exist, or the dataset does not fit the task; or a
            user's task (loaded from its file) names a relative ``eval.path`` that is neither beside
            the task file nor in the data folder, with no ``eval.hf`` to stand in.
    """
    limit = task_cfg.eval_limit
    path, kind, why = _local_eval_file(task, task_cfg)
    if kind == "file":
        named_by = "task.eval_path" if task_cfg.eval_path else f"task {task.name!r} eval.path"
        try:
            records = load_eval_records(task, path, limit, seed=seed)
        except (OSError, ValueError) as err:
            error = ConfigError if task_cfg.eval_path else TaskFileError
            raise error(f"{named_by}: cannot read the evaluation file {str(path)!r}: {err}") from None
        return EvalSet(records, f"file:{path}", f"evaluating on {len(records)} records of {path}", path)
    if kind == "mirror":
        records = load_eval_records(task, path, limit, seed=seed)
        return EvalSet(records, f"mirror:{path}", f"evaluating on {len(records)} records of the mirror file {path}", path)
    hf = task.eval.hf if task.eval else None
    if hf is None:
        return _no_eval_set(task, why)
    try:
        dataset = _load_hf_split(hf)
    except OSError as err:
        local = _local_hf_field(hf)
        if local is not None:
            # Files the user named on this machine: missing or unreadable is their mistake, not an outage.
            raise TaskFileError(f"task {task.name!r} eval.hf.{local}: cannot read {hf.source[3:]}: "
                                f"{_first_line(err)}") from None
        return _no_eval_set(task, f"{why}, and {hf.source[3:]} cannot be reached ({_first_line(err)})")
    except ValueError as err:
        if _is_uncached(err):
            return _no_eval_set(task, f"{why}, and {hf.source[3:]} is not in the datasets cache ({_first_line(err)})")
        raise TaskFileError(f"task {task.name!r} eval.hf: cannot load {hf.source[3:]}: {_first_line(err)}") from None
    except (TypeError, KeyError, AttributeError) as err:
        # `datasets` reports some malformed specs (a data_files shape, a builder argument) this way.
        raise TaskFileError(f"task {task.name!r} eval.hf: cannot load {hf.source[3:]}: {_first_line(err)}") from None
    records = _hf_eval_records(task, hf, dataset)
    if limit is not None:
        records = seeded_subset(records, limit, seed)
    because = f" ({why})" if task.eval and task.eval.path else ""
    return EvalSet(records, hf.source, f"evaluating on {len(records)} records of {hf.source[3:]}{because}")


def input_field_problems(task: TaskSpec, numbered: Sequence[tuple[int, dict[str, Any]]]) -> list[tuple[int, str]]:
    """``(line number, what is wrong)`` for each record that lacks an input field of ``task`` or
    leaves it empty (the first such field), for :func:`lines_with_problems`.

    Args:
        task: The task; its input fields must be in every record, not empty.
        numbered: ``(line number, record)`` pairs, as :func:`read_jsonl_numbered` gives them.
    """
    problems = []
    for lineno, record in numbered:
        missing = next((f for f in task.field_names if record.get(f) in (None, "")), None)
        if missing is not None:
            problems.append((lineno, f"missing or empty field {missing!r}"))
    return problems


@dataclass(frozen=True)
class TaskDataCheck:
    """What :func:`check_task_data` found: lines for people, and which of them are warnings.

    Attributes:
        found: One line per file that was found and checks (records counted).
        warnings: One line per file a run would look for and not find, or would not use as hoped.
    """

    found: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_task_data(task: TaskSpec, task_cfg: TaskConfig) -> TaskDataCheck:
    """Read and check the local files ``task`` names, as a run would find them, without running.

    The evaluation file is found as :func:`load_task_eval` finds it and checked record by record
    (input fields, target, known labels); a dataset named by ``eval.hf`` is reported, not loaded
    (that may reach the network). The seed file (``seed_path``: S3's validation set, LLKD's
    unlabelled pool unless the config names others) must hold the input fields in every record;
    what S3 would refuse in it (missing or unknown labels) is a warning, since LLKD reads only
    the input fields.

    Args:
        task: The task, as :func:`~gold_ray.run.tasks.load_task` read it (relative files beside
            the task file already made absolute).
        task_cfg: The ``task`` config section (``data_dir``; ``eval_path`` when set).

    Returns:
        The :class:`TaskDataCheck`.

    Raises:
        InputError: a file that is there does not check; the message names the task field, the
            file and the line.
        ConfigError: ``task.eval_path`` is relative and no data folder is set.
        TaskFileError: a user's task names a relative ``eval.path`` found nowhere, with no
            ``eval.hf`` to stand in (as :func:`load_task_eval`).
    """
    out = TaskDataCheck()
    if task.is_classification:
        shown = {d.get("label") for d in task.seed_demos}
        if missing := [x for x in task.label_names if x not in shown]:
            names = f"label{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
            out.warnings.append(f"seed_demos: none of {names}; the teacher then sees only the label's description "
                                "(one demo per label or more helps it)")

    def looked_for(raw: str) -> str:
        # The task's own file (TaskSpec.file; None for a shipped task) is where a relative file was looked for.
        if task.file is None or Path(os.path.expanduser(raw)).is_absolute():
            return ""
        return f"{str(Path(task.file).parent / raw)!r} does not exist, and "

    path, kind, why = _local_eval_file(task, task_cfg)
    if kind:
        try:
            records = load_eval_records(task, path)
        except (InputError, MissingFileError) as err:
            raise InputError(f"eval.path: {err}") from None
        out.found.append(f"eval: {len(records)} records of {path}")
    elif task.eval is not None and task.eval.hf is not None:
        where = f" ({why})" if task.eval.path else ""
        out.found.append(f"eval: the dataset {task.eval.hf.source[3:]}{where}, not read here; a run loads it "
                         "when it is reachable or cached, else evaluates on a synthetic hold-out")
    else:
        tried = looked_for(task.eval.path) if task.eval and task.eval.path else ""
        out.warnings.append(f"eval: {tried}{why}; a run evaluates on a synthetic hold-out")
    if not task.seed_path:
        return out
    needed = "S3 and LLKD need it unless a run's config names their files (task.val_path, task.unlabeled_path)"
    try:
        seed_file = resolve_data_path(task.seed_path, task_cfg.data_dir)
    except FileNotFoundError as err:
        out.warnings.append(f"seed_path: {looked_for(task.seed_path)}{err}; {needed}")
        return out
    if not seed_file.is_file():
        out.warnings.append(f"seed_path: {looked_for(task.seed_path)}{str(seed_file)!r} does not exist; {needed}")
        return out
    if path is not None and seed_file.resolve() == Path(path).resolve():
        out.warnings.append(f"seed_path: {seed_file} is the evaluation file; S3 and LLKD refuse it "
                            "(a strategy never learns from the test set)")
    try:
        numbered = read_jsonl_numbered(seed_file)
    except InputError as err:
        raise InputError(f"seed_path: {err}") from None
    if problems := input_field_problems(task, numbered):
        raise InputError("seed_path: " + lines_with_problems(seed_file, problems, f"task {task.name!r}"))
    try:
        load_eval_records(task, seed_file)
    except InputError as err:
        users = "LLKD can read it as its pool; " if task.is_classification else ""
        out.found.append(f"seed_path: {len(numbered)} records of {seed_file}")
        out.warnings.append(f"seed_path: {users}S3 would refuse it: {err}")
    else:
        out.found.append(f"seed_path: {len(numbered)} labelled records of {seed_file}")
    return out


def _no_eval_set(task: TaskSpec, why: str) -> EvalSet:
    note = f"task {task.name!r} has no real evaluation set here: {why}; the run evaluates on a synthetic hold-out"
    logger.warning(note)
    return EvalSet([], "none", note)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _local_hf_field(hf: HfEvalSource) -> str | None:
    """``data_files`` or ``path`` when ``hf`` names files on this machine, else None (a Hub dataset)."""
    files = hf.data_files
    if files is not None:
        names = [files] if isinstance(files, str) else list(files.values()) if isinstance(files, dict) else files
        flat = [n for item in names for n in ([item] if isinstance(item, str) else item)]
        if flat and not any("://" in n for n in flat):
            return "data_files"
    if hf.path.startswith(("/", "./", "../", "~")) or Path(os.path.expanduser(hf.path)).is_dir():
        return "path"
    return None


def _is_uncached(err: ValueError) -> bool:
    # Offline, a Hub dataset cached under another configuration fails with this ValueError
    # (datasets' cache lookup), which means "not cached", not a wrong spec.
    return "find cache" in str(err)


def _load_hf_split(hf: HfEvalSource) -> Any:
    """The split ``hf`` names, from ``datasets.load_dataset`` (its cache first when offline)."""
    import datasets  # only runs that reach for a Hub dataset pay for the import

    return datasets.load_dataset(hf.path, hf.name, split=hf.split, data_files=hf.data_files)


def _hf_eval_records(task: TaskSpec, hf: HfEvalSource, dataset: Any) -> list[dict]:
    """The task's records from a loaded ``datasets.Dataset``, with ``hf.fields`` and the labels mapped."""
    where = f"task {task.name!r} eval.hf"
    keys = (*task.field_names, task.target_key)
    columns = {key: hf.fields.get(key, key) for key in keys}
    missing = sorted({c for c in columns.values() if c not in dataset.column_names})
    if missing:
        raise TaskFileError(
            f"{where}.fields: {hf.source[3:]} has no column(s) {missing}; its columns are {dataset.column_names}"
        )
    class_names: list[str] | None = None
    if task.is_classification:
        feature = dataset.features.get(columns["label"])
        names = list(getattr(feature, "names", None) or [])
        class_names = hf.label_names or names or None
        if hf.label_names and set(names) == set(hf.label_names) and names != hf.label_names:
            # Same names in another order would silently swap the classes.
            raise TaskFileError(f"{where}.label_names: {hf.label_names} lists the classes out of their order {names}")
    table = dataset.select_columns(sorted(set(columns.values()))).to_dict()
    records = []
    for i in range(len(dataset)):
        record = {}
        for key, column in columns.items():
            value = table[column][i]
            if value is None:
                raise TaskFileError(f"{where}: {hf.source[3:]} row {i}: no value in column {column!r} ({key!r})")
            record[key] = value
        for name in task.field_names:
            record[name] = str(record[name])
        if task.is_classification:
            record["label"] = _class_label(task, record["label"], class_names, f"{where}.label_names", hf, i)
        else:
            record[task.target_key] = _target_text(record[task.target_key])
        records.append(record)
    if not records:
        raise TaskFileError(f"{where}: {hf.source[3:]} has no records")
    return records


def _class_label(
    task: TaskSpec, value: Any, class_names: list[str] | None, field_name: str, hf: HfEvalSource, row: int
) -> str:
    """The task label of one dataset label value (an integer class or a label name)."""
    at = f"{field_name}: {hf.source[3:]} row {row}"
    if isinstance(value, int) and not isinstance(value, bool):
        if class_names is None:
            raise TaskFileError(f"{at}: integer class {value} and no class names; list the task label of each class")
        if not 0 <= value < len(class_names):
            unlabelled = " (-1 marks an unlabelled example: choose a labelled split)" if value == -1 else ""
            raise TaskFileError(f"{at}: class {value} has no name in {class_names}{unlabelled}")
        value = class_names[value]
    label = str(value)
    if label not in task.label_names:
        raise TaskFileError(f"{at}: label {label!r} is not one of {task.label_names}; map the classes in eval.hf.label_names")
    return label


# ----- metrics ------------------------------------------------------------------------------


def _check_lengths(pred: Sequence[Any], gold: Sequence[Any]) -> None:
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} gold answers")


def _share(pred: Sequence[str], gold: Sequence[str], same: Callable[[str, str], bool]) -> float:
    """Share of the pairs ``(pred[i], gold[i])`` for which ``same`` holds; NaN for empty input."""
    _check_lengths(pred, gold)
    if not gold:
        return math.nan
    return sum(same(p, g) for p, g in zip(pred, gold, strict=True)) / len(gold)


def accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    """Share of exact matches; NaN for empty input.

    Args:
        pred: Predicted labels.
        gold: Gold labels.

    Returns:
        Accuracy in [0, 1].
    """
    return _share(pred, gold, operator.eq)


def macro_f1(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean over ``labels`` of each label's F1; NaN for empty input.

    Args:
        pred: Predicted labels (values outside ``labels`` count as wrong).
        gold: Gold labels.
        labels: The label set to average over.

    Returns:
        Macro F1 in [0, 1].
    """
    _check_lengths(pred, gold)
    if not gold or not labels:
        return math.nan
    scores = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(pred, gold, strict=True))
        fp = sum(p == label and g != label for p, g in zip(pred, gold, strict=True))
        fn = sum(p != label and g == label for p, g in zip(pred, gold, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores))


def per_label_accuracy(pred: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy on the records of each gold label (its recall); labels absent from ``gold`` are left out.

    Args:
        pred: Predicted labels.
        gold: Gold labels.
        labels: The label set.

    Returns:
        ``{label: accuracy}``.
    """
    _check_lengths(pred, gold)
    out = {}
    for label in labels:
        hits = [p == g for p, g in zip(pred, gold, strict=True) if g == label]
        if hits:
            out[label] = sum(hits) / len(hits)
    return out


def normalize_answer(text: str) -> str:
    """Lower-cased, whitespace collapsed, surrounding spaces and trailing ``.`` removed."""
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def exact_match(pred: Sequence[str], gold: Sequence[str]) -> float:
    """Share of predictions equal to the gold answer after :func:`normalize_answer`; NaN if empty.

    Args:
        pred: Predicted answers.
        gold: Gold answers.

    Returns:
        Exact match in [0, 1].
    """
    return _share(pred, gold, lambda p, g: normalize_answer(p) == normalize_answer(g))


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (``-3``, ``1,250``, ``2.5``), or None.

    Args:
        text: Any text.

    Returns:
        The number as a float, or None when there is none.
    """
    for match in _NUMBER.finditer(str(text)):
        try:
            return float(match.group().replace(",", ""))
        except ValueError:
            continue
    return None


def numeric_match(pred: Sequence[str], gold: Sequence[str]) -> float:
    """Like :func:`exact_match`, but an answer matches when its :func:`first_number` equals the gold's
    (within ``NUMERIC_TOLERANCE``); an answer without any number never matches."""

    def same_number(p: str, g: str) -> bool:
        a, b = first_number(p), first_number(g)
        return a is not None and b is not None and abs(a - b) <= NUMERIC_TOLERANCE

    return _share(pred, gold, same_number)


def score_predictions(task: TaskSpec, pred: Sequence[str], gold: Sequence[str]) -> dict:
    """The task's metrics for given predictions.

    Args:
        task: The task (decides which metrics apply).
        pred: Predictions (label names, or answer strings).
        gold: Gold labels or answers.

    Returns:
        Classification: ``accuracy``, ``macro_f1``, ``per_label_accuracy``, ``n``.
        Text-to-text: ``exact_match``, ``numeric_match`` (number answers only), ``n``.
    """
    if task.is_classification:
        return {
            "accuracy": accuracy(pred, gold),
            "macro_f1": macro_f1(pred, gold, task.label_names),
            "per_label_accuracy": per_label_accuracy(pred, gold, task.label_names),
            "n": len(gold),
        }
    out: dict[str, Any] = {"exact_match": exact_match(pred, gold)}
    if task.answer_type == "number":
        out["numeric_match"] = numeric_match(pred, gold)
    out["n"] = len(gold)
    return out


def _gold(task: TaskSpec, records: Sequence[dict]) -> list[str]:
    return [_target_text(r[task.target_key]) for r in records]


def evaluate_student(student: Student, task: TaskSpec, records: Sequence[dict], batch_size: int = 64) -> dict:
    """The student's metrics on labelled records (see :func:`score_predictions`).

    Args:
        student: Any :class:`gold_ray.student.model.Student`.
        task: The task.
        records: Records with the input fields and the target (e.g. from :func:`load_eval_records`).
        batch_size: Records per ``predict`` call.

    Returns:
        The metrics dict.
    """
    pred: list[str] = []
    for start in range(0, len(records), batch_size):
        pred.extend(student.predict(list(records[start : start + batch_size])))
    return score_predictions(task, pred, _gold(task, records))


FEWSHOT_PARAMS = SamplingParams(temperature=0.0)
"""Sampling of the teacher-as-classifier row: greedy (only text-to-text answers are generated)."""

AnswerFn = Callable[[list[Prompt]], list[Generation]]
"""Answers a batch of prompts: :func:`gold_ray.teacher.labelling.answer_prompts` over an engine in this
process, or a runtime's teacher (:meth:`gold_ray.run.runtime.Runtime.answer`)."""


def engine_answers(engine: TeacherEngine) -> AnswerFn:
    """The :data:`AnswerFn` of an engine in this process (classify prompts with options are scored)."""
    from gold_ray.teacher.labelling import answer_prompts

    return lambda prompts: answer_prompts(engine, prompts, FEWSHOT_PARAMS)


def fewshot_prompt(task: TaskSpec, prompt: Prompt) -> Prompt:
    """A ``classify`` prompt made answerable by scoring: a classification task's label words become
    its options (``meta["options"]``, in label order); text-to-text prompts stay as they are."""
    from gold_ray.teacher.labelling import OPTIONS_KEY

    if not task.is_classification:
        return prompt
    return replace(prompt, meta={**prompt.meta, OPTIONS_KEY: [label.word for label in task.labels]})


def fewshot_prediction(task: TaskSpec, generation: Generation) -> str:
    """One answer of the teacher read as a prediction (``""`` when it says nothing usable).

    Classification: the label whose verbalizer has the highest option score; an answer the
    engine could not score was generated instead, and the first label word in its text counts
    (as for the labeller, :mod:`gold_ray.teacher.labelling`). Text-to-text: number answers keep
    the first number written, text answers the first line.
    """
    from gold_ray.teacher.labelling import label_in_text, softmax_confidence

    if generation.error:
        return ""
    if task.is_classification:
        scored = softmax_confidence(generation.option_logprobs)
        if scored is not None and len(generation.option_logprobs or ()) == len(task.labels):
            return task.label_names[scored[0]]
        return label_in_text(task, generation.text or "") or ""
    text = generation.text.strip()
    if task.answer_type == "number":
        number = first_number(text)
        return "" if number is None else _target_text(number)
    return text.splitlines()[0].strip() if text else ""


def teacher_fewshot_predictions(
    engine: TeacherEngine | AnswerFn, prompts: Sequence[Prompt], task: TaskSpec, batch_size: int = 64
) -> list[str]:
    """The teacher's answer to each prompt, read as a prediction (:func:`fewshot_prediction`).

    Classification prompts are scored over the task's label words (:func:`fewshot_prompt`, one
    forward pass per prompt and label); text-to-text prompts are answered greedily.

    Args:
        engine: Any teacher engine, or an :data:`AnswerFn` (a runtime's teacher).
        prompts: ``classify`` prompts, one per record.
        task: The task.
        batch_size: Prompts per call.

    Returns:
        One prediction per prompt.
    """
    answer = engine if not isinstance(engine, TeacherEngine) else engine_answers(engine)
    pred: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [fewshot_prompt(task, p) for p in prompts[start : start + batch_size]]
        pred.extend(fewshot_prediction(task, g) for g in answer(chunk))
    return pred


def fewshot_prompts(task: TaskSpec, records: Sequence[dict], *, prompt_style: str,
                    max_demo_chars: int = 300) -> list[Prompt]:
    """The teacher row's ``classify`` prompt for each record: the task's seed demos, then the record."""
    from gold_ray.teacher.prompts import render_classify_prompt

    demos = list(task.seed_demos)
    return [render_classify_prompt(task, r, demos, prompt_style=prompt_style,  # type: ignore[arg-type]
                                   max_demo_chars=max_demo_chars) for r in records]


def teacher_readings(
    answer: TeacherEngine | AnswerFn, task: TaskSpec, records: Sequence[dict], *, prompt_style: str,
    max_demo_chars: int = 300,
) -> list[str]:
    """The label the teacher reads in each record, asked as the teacher row asks
    (:func:`fewshot_prompts`; ``""`` where it gives no usable answer): the label check of generated samples."""
    prompts = fewshot_prompts(task, records, prompt_style=prompt_style, max_demo_chars=max_demo_chars)
    return teacher_fewshot_predictions(answer, prompts, task)


def evaluate_teacher_fewshot(
    engine: TeacherEngine | AnswerFn,
    task: TaskSpec,
    records: Sequence[dict],
    render_prompt: Callable[[dict], Prompt],
) -> dict:
    """The teacher's own metrics on labelled records (the paper's "LLM" row).

    Args:
        engine: The teacher engine, or an :data:`AnswerFn` (a runtime's teacher).
        task: The task.
        records: Labelled records.
        render_prompt: Builds the teacher's ``classify`` prompt for one record (its target is
            never shown to the teacher by a correct renderer).

    Returns:
        The metrics of :func:`score_predictions` plus ``unanswered`` (predictions left empty:
        failed answers, answers without a label word or a number).
    """
    prompts = [render_prompt(r) for r in records]
    pred = teacher_fewshot_predictions(engine, prompts, task)
    metrics = score_predictions(task, pred, _gold(task, records))
    metrics["unanswered"] = sum(p == "" for p in pred)
    return metrics
