"""Task specifications: what the teacher must write and the student must learn.

A task is data, not code: a YAML file loaded into :class:`TaskSpec`. The shipped tasks live in
``gold_ray/tasks/*.yaml``; a user's own task is any YAML file with the same fields.

Three task types cover the GOLD paper's tasks:

- ``classification``: one input field (``text``) and a label from a fixed set (SST-2, AG News, CoLA).
- ``pair_classification``: two input fields (``text_a``, ``text_b``) and a label (RTE, QNLI, MRPC).
- ``text_to_text``: input fields and one free-text target field (SVAMP: question to numeric answer).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from gold_ray.errors import MissingFileError, UserError, parse_file

TaskType = Literal["classification", "pair_classification", "text_to_text"]

SHIPPED_TASK_DIR = Path(__file__).resolve().parents[1] / "tasks"

DATA_DIR_ENV = "GOLD_RAY_DATA"
"""Environment variable naming the folder that relative evaluation paths are resolved against."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputField(_Strict):
    """One input field of a sample.

    Attributes:
        name: Column name in records and evaluation files (``text``, ``text_a``, ``question``).
        display: How the field is named in teacher prompts (``Review``, ``Premise``).
        min_chars: Shorter generated values are rejected as ``too_short``.
        max_chars: Longer generated values are rejected as ``too_long``.
    """

    name: str
    display: str
    min_chars: int = Field(default=10, ge=0)
    max_chars: int = Field(default=400, gt=0)

    @model_validator(mode="after")
    def _bounds_in_order(self) -> InputField:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is above max_chars {self.max_chars}: every sample "
                             "would be rejected")
        return self


class LabelSpec(_Strict):
    """One class of a classification task.

    Attributes:
        name: The label as it appears in evaluation files (``positive``, ``not_entailment``).
        description: One line for the teacher saying what the label means.
        verbalizer: The word or phrase used for the label inside prompts; defaults to ``name``
            with underscores turned into spaces.
    """

    name: str
    description: str
    verbalizer: str | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        # Star ratings and the like: ``name: 1`` is the label "1", as the evaluation file spells it.
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @property
    def word(self) -> str:
        """The label as the teacher reads it."""
        return self.verbalizer or self.name.replace("_", " ")


class HfEvalSource(_Strict):
    """A dataset loadable by ``datasets.load_dataset`` that holds a task's real evaluation set.

    Attributes:
        path: What ``load_dataset`` takes as its path: a Hub dataset id (``nyu-mll/glue``), a
            packaged loader (``json``, ``csv``, ``parquet``) with ``data_files``, or a local folder.
        name: The dataset's configuration (``sst2``), when it has several.
        split: The split to evaluate on (``validation``).
        data_files: Data files for a packaged loader or a folder, in any form ``load_dataset`` takes.
        fields: Task field to dataset column, for the task's input fields and its target
            (``label`` or the target field); a field left out is read from the column of its own name.
        label_names: Classification only: the task label of each integer class, in class order
            (``[negative, positive]``: class 0 is ``negative``). Several classes may share a label.
            Default: the names of the column's ``ClassLabel`` feature. Text labels are read as they are.
    """

    path: str = Field(min_length=1)
    name: str | None = None
    split: str = Field(min_length=1)
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    fields: dict[str, str] = Field(default_factory=dict)
    label_names: list[str] | None = Field(default=None, min_length=1)

    @property
    def source(self) -> str:
        """``hf:<path>[/<name>]:<split>``, how runs record this dataset."""
        return f"hf:{self.path}{'/' + self.name if self.name else ''}:{self.split}"


class EvalSource(_Strict):
    """Where the real evaluation set of a task lives; see :func:`gold_ray.student.evaluation.load_task_eval`.

    Attributes:
        path: A JSONL file with the task's input fields and target. An absolute path is the user's
            own file and must be readable. A relative path is first looked for beside the task
            file (a task loaded by path, not a shipped one; :func:`load_task` makes it absolute
            when it is there), else it names a file of the local data mirror (``$GOLD_RAY_DATA`` or
            ``task.data_dir``), used when the mirror is set and holds it. A user's task whose file
            is in neither place, with no ``hf`` dataset to stand in, is an error; a shipped task
            then evaluates on a synthetic hold-out.
        hf: A ``datasets`` dataset with the same examples, used when no mirror file is found.
    """

    path: str | None = None
    hf: HfEvalSource | None = None

    @model_validator(mode="after")
    def _names_a_source(self) -> EvalSource:
        if self.path is None and self.hf is None:
            raise ValueError("eval: name a `path`, an `hf` dataset, or both")
        return self


class TaskSpec(_Strict):
    """A task definition loaded from YAML.

    Attributes:
        name: Short identifier (``sst2``).
        type: ``classification``, ``pair_classification`` or ``text_to_text``.
        description: What the task is, written for the teacher.
        sample_noun: What one sample is called in prompts (``movie review``, ``news article``).
        input_fields: The fields the teacher writes and the student reads.
        labels: The label set (classification types only).
        target_field: For ``text_to_text``: the field the student must produce (``answer``).
        target_display: How the target is named in prompts (``Answer``).
        answer_type: ``text`` or ``number``; ``number`` compares answers numerically.
        seed_demos: Three to five demonstrations written for this project, one dict per sample
            with every input field and ``label`` (or the target field).
        output_format: The layout the teacher must follow, shown in the prompt.
        style_hints: Diversity knobs; one is drawn at random (seeded) per prompt.
        eval: The real evaluation set, if any.
        seed_path: Optional JSONL of real labelled examples (for S3 validation or demos), never the test set.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    type: TaskType
    description: str = Field(min_length=1, pattern=r"\S")
    sample_noun: str = "text"
    input_fields: list[InputField] = Field(min_length=1)
    labels: list[LabelSpec] = Field(default_factory=list)
    target_field: str | None = None
    target_display: str = "Answer"
    answer_type: Literal["text", "number"] = "text"
    seed_demos: list[dict[str, Any]] = Field(min_length=1)
    output_format: str = ""
    style_hints: list[str] = Field(default_factory=list)
    eval: EvalSource | None = None
    seed_path: str | None = None
    _file: str | None = PrivateAttr(default=None)

    @property
    def file(self) -> str | None:
        """The file a user's task was loaded from (:func:`load_task` by path); None for a shipped
        task, whose relative files belong to the data mirror, or a task built in code."""
        return self._file

    def beside_file(self, raw: str) -> Path | None:
        """Where a relative path the task names lies beside the task's file (absolute, whether or not it
        exists); None for an absolute path or a task without a file (:attr:`file`)."""
        if self._file is None or Path(os.path.expanduser(raw)).is_absolute():
            return None
        return (Path(self._file).parent / raw).absolute()

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: list[LabelSpec]) -> list[LabelSpec]:
        names = [label.name for label in labels]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate label names: {dupes}")
        # The teacher's answers and the leak check compare labels without case.
        folded = [n.casefold() for n in names]
        clash = sorted({n for n in names if folded.count(n.casefold()) > 1})
        if clash:
            raise ValueError(f"label names that differ only in case: {clash}")
        return labels

    @field_validator("seed_demos", mode="before")
    @classmethod
    def _demo_numbers_as_text(cls, demos: Any) -> Any:
        # ``answer: 42`` or ``label: 1`` in YAML is a number; every field of a sample is text.
        if not isinstance(demos, list):
            return demos
        return [{k: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for k, v in d.items()}
                if isinstance(d, dict) else d for d in demos]

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        names = [f.name for f in self.input_fields]
        if len(set(names)) != len(names):
            raise ValueError(f"input_fields: duplicate field names {names}")
        if self.type == "pair_classification" and len(names) != 2:
            raise ValueError("input_fields: a pair_classification task needs exactly two input fields")
        if self.is_classification:
            if len(self.labels) < 2:
                raise ValueError("labels: a classification task needs at least two labels")
            if self.target_field is not None:
                raise ValueError("target_field: only text_to_text tasks have a target field")
        else:
            if not self.target_field:
                raise ValueError("target_field: a text_to_text task must name its target field")
            if self.target_field in names:
                raise ValueError(f"target_field: {self.target_field!r} is an input field too; name the answer "
                                 "field apart from what the student reads")
            if self.labels:
                raise ValueError("labels: a text_to_text task has no label set")
        wanted = set(names) | {self.target_key}
        label_names = set(self.label_names)
        for i, demo in enumerate(self.seed_demos):
            missing = sorted(wanted - set(demo))
            if missing:
                raise ValueError(f"seed_demos[{i}]: missing field(s) {missing}")
            extra = sorted(set(demo) - wanted)
            if extra:
                raise ValueError(f"seed_demos[{i}]: unknown field(s) {extra}")
            if self.is_classification and demo["label"] not in label_names:
                raise ValueError(
                    f"seed_demos[{i}].label: {demo['label']!r} is not in the label set {sorted(label_names)}"
                )
        hf = self.eval.hf if self.eval else None
        if hf is not None:
            unknown = sorted(set(hf.fields) - wanted)
            if unknown:
                raise ValueError(f"eval.hf.fields: {unknown} are not fields of the task; its fields are {sorted(wanted)}")
            if hf.label_names is not None:
                if not self.is_classification:
                    raise ValueError("eval.hf.label_names: a text_to_text task has no label set")
                bad = sorted(set(hf.label_names) - label_names)
                if bad:
                    raise ValueError(f"eval.hf.label_names: {bad} are not in the label set {sorted(label_names)}")
        return self

    @property
    def is_classification(self) -> bool:
        """True for ``classification`` and ``pair_classification`` tasks."""
        return self.type != "text_to_text"

    @property
    def label_names(self) -> list[str]:
        """Label names in the order of the student's output logits."""
        return [label.name for label in self.labels]

    @property
    def field_names(self) -> list[str]:
        """Names of the input fields."""
        return [f.name for f in self.input_fields]

    @property
    def target_key(self) -> str:
        """The record key holding the supervision: ``label`` or the target field."""
        return "label" if self.is_classification else str(self.target_field)

    def label(self, name: str) -> LabelSpec:
        """The :class:`LabelSpec` called ``name``."""
        for label in self.labels:
            if label.name == name:
                return label
        raise KeyError(f"task {self.name!r} has no label {name!r}; labels are {self.label_names}")

    def eval_path(self, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
        """The evaluation JSONL path, resolved against ``data_dir`` or ``$GOLD_RAY_DATA``.

        Returns None when the task names no local evaluation file.
        """
        if self.eval is None or self.eval.path is None:
            return None
        return resolve_data_path(self.eval.path, data_dir)


def resolve_data_path(path: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolve a data path: absolute paths stay, relative ones join ``data_dir`` or ``$GOLD_RAY_DATA``."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return p
    base = data_dir or os.environ.get(DATA_DIR_ENV)
    if not base:
        raise MissingFileError(
            f"{path!r} is relative and no data folder is set: set ${DATA_DIR_ENV} or task.data_dir"
        )
    return Path(base) / p


class TaskFileError(UserError, ValueError):
    """A task file that does not parse or validate; the message names the file and the fields."""


def shipped_tasks() -> dict[str, Path]:
    """Names and paths of the task files shipped with gold-ray."""
    return {p.stem: p for p in sorted(SHIPPED_TASK_DIR.glob("*.yaml"))}


def load_task(name_or_path: str | os.PathLike[str]) -> TaskSpec:
    """Load a shipped task by name (``sst2``) or any task YAML file by path.

    A task file's relative ``eval.path`` or ``seed_path`` that exists beside the file comes back as
    an absolute path.

    Raises:
        TaskFileError: the file is missing, is not YAML, or does not validate; the message lists
            every error with its field.
    """
    text = str(name_or_path)
    shipped = shipped_tasks()
    path = shipped.get(text) or Path(text)
    if not path.is_file():
        raise TaskFileError(
            f"task {text!r}: no such file and no shipped task of that name "
            f"(shipped: {', '.join(shipped)})"
        )
    data = parse_file(path, "yaml", lambda err: TaskFileError(f"{path}: not valid YAML: {err}"))
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: expected a mapping of task fields, got {type(data).__name__}")
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as err:
        raise TaskFileError(f"{path}:\n{format_validation_error(err)}") from err
    if text in shipped:
        return spec
    spec._file = str(path.absolute())
    return _files_beside(spec)


def _files_beside(spec: TaskSpec) -> TaskSpec:
    # A user's task names its evaluation and seed files as they see them, often beside the task
    # file: such a file wins over a data mirror's, and is kept as an absolute path so the run's
    # copy of the task and a resume from another directory find it too.
    def beside(raw: str | None) -> str | None:
        there = spec.beside_file(raw) if raw is not None else None
        return str(there) if there is not None and there.is_file() else None

    update: dict[str, Any] = {}
    if spec.eval is not None and (found := beside(spec.eval.path)):
        update["eval"] = spec.eval.model_copy(update={"path": found})
    if found := beside(spec.seed_path):
        update["seed_path"] = found
    return spec.model_copy(update=update) if update else spec


def format_validation_error(err: ValidationError) -> str:
    """One line per error, each starting with the dotted field path.

    A check of the whole file names its field in its own message, which then stands alone; an
    unknown key gets the closest known one of its section as a suggestion.
    """
    lines = []
    for e in err.errors():
        loc = ".".join(str(part) for part in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"]:
            known = _known_keys(err.title, e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1, cutoff=0.5)
            msg += f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})" if known else ""
        lines.append(f"  {msg}" if not loc else f"  {loc}: {msg}")
    return "\n".join(lines)


def _known_keys(model_name: str, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that holds ``loc`` inside the model named ``model_name``."""
    from gold_ray.config import RunConfig

    model: Any = {"TaskSpec": TaskSpec, "RunConfig": RunConfig}.get(model_name)
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        model = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
    return sorted(model.model_fields) if model is not None else []
