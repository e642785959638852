"""MLflow tracking of a run: params, per-iteration metrics, artifacts and the final student.

:func:`build_tracker` returns an :class:`MlflowTracker` when ``tracking.enabled`` is true and a
:class:`NullTracker` (same methods, no effect) otherwise, so callers never branch on tracking.

The tracker talks to MLflow through ``MlflowClient`` with an explicit run id instead of the fluent
``mlflow.start_run`` API: the fluent API keeps a process-global stack of active runs, which does
not fit a driver actor that may also host other work.

Secrets never reach MLflow: a logged value that contains the value of an environment variable
whose name ends in ``_KEY``, ``_TOKEN``, ``_SECRET`` or ``_PASSWORD`` is dropped (params) or
replaced by ``[redacted]`` (dicts). The config itself only names such variables
(``teacher.api_key_env``) and never holds a key.

The child-run helpers at the bottom (:func:`start_child_run`, :func:`log_metric_rows`,
:func:`end_child_run`) let Ray Train's rank 0 log training steps into a run nested under the
driver's run.

``mlflow`` is imported inside the methods: importing it takes seconds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from gold_ray.config import RunConfig

logger = logging.getLogger(__name__)

SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
"""Environment variables whose names end like this hold secrets that must never be logged."""

REDACTED = "[redacted]"
"""What a secret inside a logged dict is replaced with."""

_MIN_SECRET_LEN = 4  # shorter values ("1", "on") would redact half the config by accident
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


def resolve_tracking_uri(cfg: RunConfig, run_dir: str | os.PathLike[str]) -> str:
    """The MLflow tracking URI of a run.

    Args:
        cfg: The run config.
        run_dir: The run's output directory.

    Returns:
        ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
        ``mlflow.db`` in ``run_dir``.
    """
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _allow_file_store(uri: str) -> None:
    # MLflow 3 refuses the (deprecated) file store unless this is set; a user who configured a
    # file store asked for it.
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _client(uri: str) -> Any:
    _allow_file_store(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-looking environment variables (see :data:`SECRET_SUFFIXES`).

    Args:
        environ: The environment to read; default ``os.environ``.

    Returns:
        The non-trivial secret values, longest first.
    """
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if k.upper().endswith(SECRET_SUFFIXES) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _has_secret(text: str, secrets: list[str]) -> bool:
    return any(s in text for s in secrets)


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with string values (lists as JSON).

    Args:
        data: A nested mapping, e.g. ``RunConfig.model_dump(mode="json")``.
        prefix: Prepended to every key.

    Returns:
        ``{"strategy.band_lo": "0.5", ...}``.
    """
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = str(value)
    return flat


def safe_params(config: RunConfig | Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The flattened params of ``config`` with every secret-bearing value dropped.

    Args:
        config: A run config or a nested mapping.
        environ: The environment whose secrets are looked for; default ``os.environ``.

    Returns:
        Dotted keys to string values, each at most MLflow's param length.
    """
    data = config.model_dump(mode="json") if isinstance(config, RunConfig) else dict(config)
    secrets = secret_values(environ)
    out = {}
    for key, value in flatten_params(data).items():
        if _has_secret(key, secrets) or _has_secret(value, secrets):
            logger.warning("not logging param %s: its value contains a secret from the environment", key)
            continue
        out[key] = value[:_MAX_PARAM_LEN]
    return out


def redact(obj: Any, secrets: list[str]) -> Any:
    """``obj`` with every secret inside its strings replaced by :data:`REDACTED`.

    Args:
        obj: JSON-like data (dicts, lists, scalars).
        secrets: Values to hide (see :func:`secret_values`).

    Returns:
        A redacted copy.
    """
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        return obj
    if isinstance(obj, Mapping):
        return {redact(str(k), secrets): redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v, secrets) for v in obj]
    return obj


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``metrics`` as floats, keys made MLflow-safe.

    Args:
        metrics: Any mapping; strings, None, NaN and infinities are left out.

    Returns:
        Metric name to value.
    """
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            continue
        number = float(value)
        if math.isfinite(number):
            out[_BAD_KEY_CHARS.sub("_", str(key))] = number
    return out


def _artifact_location(uri: str) -> str | None:
    # A SQLite store's experiments default to ./mlruns in the *current* directory; keep the
    # artifacts next to the database instead.
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None


class MlflowTracker:
    """Logs one run to MLflow.

    Args:
        cfg: The run config (``tracking`` section: URI and experiment).
        run_dir: The run's output directory; holds ``mlflow.db`` when no URI is configured.

    Attributes:
        tracking_uri: The resolved tracking URI.
        experiment: The experiment name.
        parent_run_id: The run a new run is nested under (``tracking.parent_run_id``), or None.
        run_id: The active run's id (None before :meth:`start`).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike[str]):
        self.tracking_uri = resolve_tracking_uri(cfg, run_dir)
        self.experiment = cfg.tracking.experiment
        self.parent_run_id = cfg.tracking.parent_run_id
        self.run_id: str | None = None
        self._client_obj: Any = None

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` of :attr:`tracking_uri` (created on first use)."""
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(self.experiment, artifact_location=_artifact_location(self.tracking_uri))
        except MlflowException:
            # Another process created it in between.
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker: call start() before logging")
        return self.run_id

    def start(self, run_name: str, resume_run_id: str | None = None) -> str:
        """Start a new run, or reopen ``resume_run_id`` (a resumed distillation keeps its run).

        Args:
            run_name: Name of a new run.
            resume_run_id: Id of the run to continue; when the store no longer has it, a new
                run is started (with a warning).

        Returns:
            The run id.
        """
        if resume_run_id:
            from mlflow.exceptions import MlflowException

            try:
                self.client.get_run(resume_run_id)
            except MlflowException:
                logger.warning("MLflow run %s not found in %s; starting a new run", resume_run_id, self.tracking_uri)
            else:
                self.client.update_run(resume_run_id, status="RUNNING")
                self.run_id = resume_run_id
                return resume_run_id
        tags = {"gold_ray.run_name": run_name}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def parent_info(self) -> dict[str, str] | None:
        """``{"tracking_uri", "run_id"}`` for nesting a Ray Train child run under this run."""
        if self.run_id is None:
            return None
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log_params(self, config: RunConfig | Mapping[str, Any]) -> None:
        """Log the config as flattened dotted params (``strategy.band_lo``), secrets left out.

        MLflow params cannot change once logged: on a resumed run, keys already present are
        skipped, and a changed value is logged as a ``changed.<key>`` tag instead.

        Args:
            config: A run config or a nested mapping.
        """
        run_id = self._require_run()
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(run_id).data.params
        params, tags = [], []
        for key, value in safe_params(config).items():
            if key not in existing:
                params.append(Param(key, value))
            elif existing[key] != value:
                tags.append(RunTag(f"changed.{key}", value))
        for start in range(0, max(len(params), len(tags)), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=params[start : start + 100], tags=tags[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numeric entries of ``metrics`` (others are skipped).

        Args:
            metrics: Name to value.
            step: The step (iteration) they belong to.
        """
        run_id = self._require_run()
        values = numeric_metrics(metrics)
        if not values:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, int(step or 0)) for k, v in values.items()]
        for start in range(0, len(rows), 1000):
            self.client.log_batch(run_id, metrics=rows[start : start + 1000])

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, as run artifacts.

        Args:
            path: A file or folder.
            artifact_path: Folder inside the run's artifacts.
        """
        run_id = self._require_run()
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        """Store JSON-like data as an artifact file (``.json`` or ``.yaml`` by ``name``), secrets redacted.

        Args:
            obj: The data.
            name: Artifact file name, e.g. ``metrics.json``.
        """
        self.client.log_dict(self._require_run(), redact(obj, secret_values()), name)

    def local_artifact_dir(self) -> Path | None:
        """The run's artifact folder when the artifact store is a local folder (``file:``), else None."""
        uri = self.client.get_run(self._require_run()).info.artifact_uri
        if not uri.startswith("file:"):
            return None
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path))

    def log_student_model(self, student_dir: str | os.PathLike[str]) -> None:
        """Log a saved student (its HF folder) as the artifact folder ``student``.

        With a local artifact store on the student's file system (the default: ``mlartifacts/``
        beside the run's ``mlflow.db``), the artifact's files are hard links to the student's, so
        the model is on disk once and still reads back through ``MlflowClient`` like any
        artifact; elsewhere (a tracking server, another file system) it is uploaded.

        Args:
            student_dir: The folder :meth:`gold_ray.student.model.Student.save` wrote.
        """
        root = self.local_artifact_dir()
        if root is not None and link_tree(Path(student_dir), root / "student"):
            return
        self.log_artifact(student_dir, "student")

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ended.

        Args:
            status: ``FINISHED``, ``FAILED`` or ``KILLED``.
        """
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def finish(self, metrics: dict[str, Any], run_dir: str | os.PathLike[str]) -> None:
        """End a finished distillation's run: ``metrics.json`` and the student, status FINISHED;
        ``metrics["mlflow"]`` then names the run. The ``final.*`` metrics are not logged here: the
        final stage logged them before it committed, like every stage.

        Args:
            metrics: The run metrics (updated in place).
            run_dir: The run's output directory.
        """
        self.log_artifact(Path(run_dir) / "metrics.json")
        self.log_student_model(Path(run_dir) / "student")
        self.end("FINISHED")
        metrics["mlflow"] = {"tracking_uri": self.tracking_uri, "run_id": self.run_id}


def link_tree(src: Path, dest: Path) -> bool:
    """Hard-link every file under ``src`` to the same place under ``dest`` (replaced when present).

    Both names then share one copy on disk: gold-ray never rewrites a finished run's student in
    place (a rerun with ``--overwrite`` removes the whole run directory first).

    Returns:
        True when every file is linked; False, with ``dest`` removed, when the file system
        refuses (another device, no hard links), so the caller copies instead.
    """
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    try:
        for path in sorted(src.rglob("*")):
            target = dest / path.relative_to(src)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
    except OSError as err:
        logger.info("could not hard-link %s into %s (%s); copying it", src, dest, err)
        shutil.rmtree(dest, ignore_errors=True)
        return False
    return True


class NullTracker:
    """A tracker that does nothing (``tracking.enabled: false``); same methods as :class:`MlflowTracker`."""

    run_id: str | None = None

    def start(self, run_name: str, resume_run_id: str | None = None) -> str | None:
        """Return ``resume_run_id`` unchanged; nothing is started."""
        return resume_run_id

    def parent_info(self) -> dict[str, str] | None:
        """Always None: there is no run to nest under."""
        return None

    def log_params(self, config: RunConfig | Mapping[str, Any]) -> None:
        """Do nothing."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Do nothing."""

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Do nothing."""

    def log_dict(self, obj: Any, name: str) -> None:
        """Do nothing."""

    def log_student_model(self, student_dir: str | os.PathLike[str]) -> None:
        """Do nothing."""

    def end(self, status: str = "FINISHED") -> None:
        """Do nothing."""

    def finish(self, metrics: dict[str, Any], run_dir: str | os.PathLike[str]) -> None:
        """Do nothing."""


Tracker = MlflowTracker | NullTracker


def build_tracker(cfg: RunConfig, run_dir: str | os.PathLike[str]) -> Tracker:
    """An :class:`MlflowTracker`, or a :class:`NullTracker` when ``tracking.enabled`` is false.

    Args:
        cfg: The run config.
        run_dir: The run's output directory.

    Returns:
        The tracker (no run started yet).
    """
    if not cfg.tracking.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_dir)


# ---- child runs for Ray Train's rank 0 ---------------------------------------------------------


def start_child_run(parent: Mapping[str, str], run_name: str) -> str:
    """Create a run nested under ``parent`` (in the parent's experiment).

    Args:
        parent: ``{"tracking_uri", "run_id"}`` (see :meth:`MlflowTracker.parent_info`).
        run_name: The child's name.

    Returns:
        The child run id.
    """
    client = _client(parent["tracking_uri"])
    experiment_id = client.get_run(parent["run_id"]).info.experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent["run_id"]})
    return run.info.run_id


def log_metric_rows(tracking_uri: str, run_id: str, rows: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
    """Log ``(step, metrics)`` rows into a run in one batch (finite numbers only).

    Args:
        tracking_uri: The store.
        run_id: The run.
        rows: Step and its metrics.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, int(step)) for step, metrics in rows for k, v in numeric_metrics(metrics).items()]
    client = _client(tracking_uri)
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])


def end_child_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark a child run ended.

    Args:
        tracking_uri: The store.
        run_id: The run.
        status: ``FINISHED`` or ``FAILED``.
    """
    _client(tracking_uri).set_terminated(run_id, status=status)
