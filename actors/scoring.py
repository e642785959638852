"""Energy (OOD) scoring of generated samples by a pool of Ray actors.

Each :class:`EnergyScorer` holds a student and scores every batch it is given. Two ways to run them:

- :class:`ScorerPool` (what a run uses): long-lived actors, started on first use and kept for the
  whole run with the student loaded. A new student reaches them as weights through the object
  store, tagged with a version; an actor reloads only when a batch carries a version it does not
  hold. Ray Data still streams the samples: a light ``map_batches`` task forwards each batch to one
  of the warm actors. Measured on a 2-core machine with MiniLM, starting a scorer actor and
  loading the student took 8 s; scoring 13 probes on a warm one, 0.2 s.
- :func:`score_dataset` without a pool: a Ray Data actor pool started for that one dataset.

Only accepted samples are scored: a row with a reject reason, or without its input fields, gets ``NaN``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from gold_ray.config import RunConfig
from gold_ray.devices import shared_threads
from gold_ray.run.faults import fault_point
from gold_ray.run.tasks import TaskSpec, load_task

if TYPE_CHECKING:
    from gold_ray.student.model import Student

SCORE_COLUMN = "score"
"""Column the scorer writes (float64; NaN for rows that were not scored)."""

SCORED_AT_COLUMN = "scored_at"
"""Wall-clock time (``time.time()``) the row's batch was scored; lets a caller check streaming."""

SCORED_BY_COLUMN = "scored_by"
"""``host:pid`` of the scorer actor that scored the row's batch (how many actors did the work)."""


def _missing(value: Any) -> bool:
    """True for the ways an absent string shows up in a numpy batch: None, NaN, empty."""
    if value is None:
        return True
    if isinstance(value, float | np.floating) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def scorable_rows(batch: dict[str, np.ndarray], task: TaskSpec) -> list[int]:
    """Indices of the rows of ``batch`` that are accepted samples with every input field.

    Args:
        batch: A numpy batch; a missing ``reject_reason`` column means no row was rejected.
        task: The task whose input fields must be present.

    Returns:
        Row indices, ascending.
    """
    n = len(next(iter(batch.values()))) if batch else 0
    reasons = batch.get("reject_reason")
    out = []
    for i in range(n):
        if reasons is not None and not _missing(reasons[i]):
            continue
        if any(name not in batch or _missing(batch[name][i]) for name in task.field_names):
            continue
        out.append(i)
    return out


class EnergyScorer:
    """Ray Data class UDF: adds a float ``score`` column (energy by default) to each batch.

    Args:
        checkpoint_dir: Folder of a saved student (``Student.save``).
        task_name_or_path: The task, as a shipped name, a task YAML path or a :class:`TaskSpec`.
        score: ``energy``, ``msp``, ``nll`` or ``random`` (see ``Student.ood_scores``).
        temperature: Energy temperature T.
        mode: Text-to-text energy mode, ``masked`` or ``code_faithful``.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        task_name_or_path: str | TaskSpec,
        score: str = "energy",
        temperature: float = 1.0,
        mode: str = "masked",
    ):
        # Imported here so that building a pipeline on the driver does not load torch.
        from gold_ray.student.model import load_student

        self.task = (
            task_name_or_path if isinstance(task_name_or_path, TaskSpec) else load_task(task_name_or_path)
        )
        self.student = load_student(checkpoint_dir, self.task)
        self.score = score
        self.temperature = temperature
        self.mode = mode
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def _record(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        keys = [*self.task.field_names, self.task.target_key]
        return {k: (None if k not in batch or _missing(batch[k][i]) else str(batch[k][i])) for k in keys}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` with ``score`` (NaN where not scored), ``scored_at`` and ``scored_by`` added."""
        n = len(next(iter(batch.values()))) if batch else 0
        fault_point("score.batch", rows=n)
        scores = np.full(n, np.nan, dtype=np.float64)
        rows = scorable_rows(batch, self.task)
        if rows:
            records = [self._record(batch, i) for i in rows]
            values = self.student.ood_scores(
                records, score=self.score, temperature=self.temperature, mode=self.mode
            )
            scores[rows] = np.asarray(values, dtype=np.float64)
        batch[SCORE_COLUMN] = scores
        batch[SCORED_AT_COLUMN] = np.full(n, time.time(), dtype=np.float64)
        batch[SCORED_BY_COLUMN] = np.full(n, self.identity, dtype=object)
        return batch


def scorer_resources(cfg: RunConfig) -> dict[str, Any]:
    """``num_cpus`` (and ``num_gpus`` and custom ``resources`` when the config asks) of one scorer actor."""
    r = cfg.resources
    resources: dict[str, Any] = {"num_cpus": r.scorer_num_cpus}
    if r.scorer_num_gpus > 0:
        resources["num_gpus"] = r.scorer_num_gpus
    if r.scorer_resources:
        resources["resources"] = dict(r.scorer_resources)
    return resources


SCORER_MAX_RESTARTS = 8
"""Times Ray restarts a pool's scorer actor that died (and resends the call it was running):
finite, so that a process that dies on every start (out of memory loading the student) ends in
an error rather than in restarting for ever."""

CALLS_IN_FLIGHT_PER_SCORER = 2
"""Forwarded batches per warm scorer at once: one scoring, one queued behind it, so an actor
never waits for a forwarder's round trip between batches."""

FORWARD_NUM_CPUS = 0.0
"""CPUs of one forwarding task: none, as it only waits for a scorer actor; any share would have
to be free beside the run's warm actors, which may book every CPU of a small cluster."""


class WarmScorer(EnergyScorer):
    """The body of one :class:`ScorerPool` actor: an :class:`EnergyScorer` that takes new weights.

    Args:
        skeleton: One reference to the files of a saved student (``Student.save``), by path
            relative to its folder: written to a private temporary folder, loaded and removed
            again, so the actor needs no shared file system and survives the run deleting its
            checkpoints. Wrapped in a list so that Ray does not resolve it before the constructor
            runs (it warns about constructor arguments in the object store; the pool keeps this
            one alive for the actors' restarts).
        version: The version of the skeleton's own weights.
        task: The task.
        score: ``energy``, ``msp``, ``nll`` or ``random``.
        temperature: Energy temperature T.
        mode: Text-to-text energy mode.
    """

    def __init__(self, skeleton: list[ray.ObjectRef], version: int, task: TaskSpec, score: str = "energy",
                 temperature: float = 1.0, mode: str = "masked"):
        with tempfile.TemporaryDirectory(prefix="gold-ray-scorer-") as folder:
            for name, data in ray.get(skeleton[0]).items():
                path = Path(folder, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            super().__init__(folder, task, score=score, temperature=temperature, mode=mode)
        self.version = version
        # The pool runs this actor with several threads so that a forwarder can ask whether it is
        # free without queueing behind a batch; the student scores one batch at a time.
        self._scoring = threading.Lock()

    def score_batch(self, batch: dict[str, np.ndarray], version: int, weights: list[ray.ObjectRef],
                    wait: bool = True) -> dict[str, np.ndarray] | None:
        """``batch`` scored by the weights of ``version``, loaded from ``weights[0]`` unless already held.

        The reference comes wrapped in a list so that Ray hands it over unresolved: a call for the
        version the actor holds does not fetch the weights at all. An actor that Ray restarted
        holds its skeleton's version again, and so reloads by itself on its next call.

        Args:
            batch: A numpy batch.
            version: The weights' version.
            weights: ``[ObjectRef]`` of the weights' state dict.
            wait: False returns None at once when the actor is scoring another batch.
        """
        if not self._scoring.acquire(blocking=wait):
            return None
        try:
            self._hold(version, weights)
            return self(batch)
        finally:
            self._scoring.release()

    def _hold(self, version: int, weights: list[ray.ObjectRef]) -> None:
        if version != self.version:
            self.student.model.load_state_dict(ray.get(weights[0]))
            self.student.model.eval()
            self.version = version

    def evaluate(self, records: list[dict[str, Any]], version: int, weights: list[ray.ObjectRef]) -> dict[str, Any]:
        """The metrics of :func:`gold_ray.student.evaluation.evaluate_student` on ``records``, with the
        weights of ``version`` (loaded as :meth:`score_batch` does).

        It computes on the node's cores, not on the one thread Ray gives an actor that books half a
        CPU: a run evaluates after a training, while the teacher and the trainers wait.
        """
        import torch

        from gold_ray.student.evaluation import evaluate_student

        with self._scoring:
            self._hold(version, weights)
            threads = torch.get_num_threads()
            torch.set_num_threads(shared_threads(1))
            try:
                return evaluate_student(self.student, self.task, records)
            finally:
                torch.set_num_threads(threads)

    def describe(self) -> dict[str, Any]:
        """``identity`` (``host:pid``, as in ``scored_by``) and the weights ``version`` it holds."""
        return {"identity": self.identity, "version": self.version}


# Where this worker process starts its turn over the actors: forwarding tasks run in whichever
# worker Ray picks, so a shared counter is not available; a random start per process and a turn
# per batch spread the batches without one.
_turns = itertools.count(random.randrange(1 << 16))


def _forward(batch: dict[str, np.ndarray], *, actors: list[Any], version: int,
             weights: list[ray.ObjectRef]) -> dict[str, np.ndarray]:
    """Ray Data function: score ``batch`` on an idle warm actor, else queue it at this turn's actor
    (the next one if that one is dead)."""
    first = next(_turns)
    order = [actors[(first + k) % len(actors)] for k in range(len(actors))]
    ref = ray.put(batch)  # sent once, however many actors are asked
    # Independent turns leave one actor with three batches and another idle often enough (seen
    # with four batches on two actors) that asking first pays for its round trips.
    for actor in order:
        try:
            out = ray.get(actor.score_batch.remote(ref, version, weights, False))
        except ray.exceptions.RayActorError:
            continue
        if out is not None:
            return out
    error: Exception | None = None
    for actor in order:
        try:
            return ray.get(actor.score_batch.remote(ref, version, weights))
        except ray.exceptions.RayActorError as err:  # restarts used up: the others take its work
            error = err
    assert error is not None
    raise error


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _folder_key(folder: Path) -> tuple:
    """What tells one saved student from another without reading it: its files' names, sizes and times."""
    return (str(folder.resolve()), *((str(f.relative_to(folder)), st.st_size, st.st_mtime_ns)
                                     for f in sorted(folder.rglob("*")) if f.is_file() and (st := f.stat())))


# Written into a model's config by saving or by where it was loaded from; they change no weight
# and no forward pass, so two students that differ only in them share a skeleton.
_CONFIG_BOOKKEEPING = ("architectures", "_name_or_path", "transformers_version")


def architecture_key(student: Student) -> str:
    """What must match for ``student``'s weights to load into a skeleton an actor already holds:
    the student's class, its model config less bookkeeping, and its weights' names and shapes.

    A student never saved and the same student saved and loaded again have one key
    (``save_pretrained`` writes ``architectures`` into the config in memory too).
    """
    config = {k: v for k, v in student.model.config.to_dict().items() if k not in _CONFIG_BOOKKEEPING}
    shapes = [(name, tuple(t.shape)) for name, t in student.model.state_dict().items()]
    return json.dumps([type(student).__name__, config, shapes], sort_keys=True, default=str)


class ScorerPool:
    """The energy scorers of a whole run: ``resources.scorer_max_actors`` long-lived Ray actors.

    Actors start on the first :meth:`score_dataset` and live until :meth:`close`, holding the
    student in memory. :meth:`set_student` publishes new weights (one ``ray.put``, a new version);
    each actor fetches them on its first batch of that version. Ray restarts an actor that dies
    (``SCORER_MAX_RESTARTS``) and resends its call, which then reloads the weights by itself.

    Args:
        cfg: The run config (pool size and actor resources from ``resources``, the score from ``strategy``).
        task: The task (name, YAML path or spec).
    """

    def __init__(self, cfg: RunConfig, task: str | TaskSpec):
        self.cfg = cfg
        self.task = task if isinstance(task, TaskSpec) else load_task(task)
        self._actors: list[Any] = []
        self._version = 0
        self._weights: ray.ObjectRef | None = None
        self._key: tuple | None = None
        self._skeleton: ray.ObjectRef | None = None
        self._skeleton_version = 0
        self._architecture: str | None = None

    @property
    def version(self) -> int:
        """The version of the current weights (0 before the first :meth:`set_student`)."""
        return self._version

    @property
    def actors(self) -> list[Any]:
        """The actor handles (empty until the first :meth:`score_dataset`, and after :meth:`close`)."""
        return list(self._actors)

    def set_student(self, student_or_checkpoint: Student | str | Path) -> int:
        """Make ``student_or_checkpoint`` the student that later :meth:`score_dataset` calls score with.

        A checkpoint folder already published (same files, sizes and times) is not published again.
        A student of another architecture replaces the actors (they start again on next use).

        Args:
            student_or_checkpoint: A :class:`~gold_ray.student.model.Student`, or a folder it was saved to.

        Returns:
            The version the weights were published as.
        """
        folder = None
        if isinstance(student_or_checkpoint, str | Path):
            folder = Path(student_or_checkpoint)
            key = _folder_key(folder)
            if key == self._key:
                return self._version
            from gold_ray.student.model import load_student

            student = load_student(folder, self.task, device="cpu")
        else:
            student, key = student_or_checkpoint, None
        self._version += 1
        self._weights = ray.put({k: v.detach().cpu() for k, v in student.model.state_dict().items()})
        self._key = key
        architecture = architecture_key(student)
        if architecture != self._architecture:
            self._publish_skeleton(student, folder)
            self._architecture = architecture
        return self._version

    def _publish_skeleton(self, student: Student, folder: Path | None) -> None:
        """The files actors start from; actors holding another architecture are stopped."""
        if folder is None:
            with tempfile.TemporaryDirectory(prefix="gold-ray-skeleton-") as tmp:
                student.save(tmp)
                files = _folder_files(Path(tmp))
        else:
            files = _folder_files(folder)
        self._stop_actors()
        # Kept by the pool for the run: Ray passes it again to an actor it restarts.
        self._skeleton = ray.put(files)
        self._skeleton_version = self._version

    def _start_actors(self) -> list[Any]:
        if not self._actors:
            s = self.cfg.strategy
            actors = self.cfg.resources.scorer_max_actors
            # A thread for every forwarder that may wait here and one more, so that asking whether
            # the actor is free never queues behind them.
            actor = ray.remote(WarmScorer).options(
                max_restarts=SCORER_MAX_RESTARTS, max_task_retries=SCORER_MAX_RESTARTS,
                max_concurrency=actors * CALLS_IN_FLIGHT_PER_SCORER + 1, **scorer_resources(self.cfg))
            self._actors = [
                actor.remote([self._skeleton], self._skeleton_version, self.task, score=s.score,
                             temperature=s.energy_temperature, mode=s.energy_mode)
                for _ in range(actors)
            ]
        return self._actors

    def score_dataset(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """``ds`` with ``score``, ``scored_at`` and ``scored_by`` columns from the warm actors (lazy).

        The dataset scores with the weights current now, even if :meth:`set_student` is called
        again before it runs.

        Raises:
            RuntimeError: no student was set yet.
        """
        if self._weights is None:
            raise RuntimeError("ScorerPool.score_dataset before set_student")
        actors = self._start_actors()
        return ds.map_batches(
            _forward,
            fn_kwargs={"actors": actors, "version": self._version, "weights": [self._weights]},
            batch_size=self.cfg.resources.scorer_batch_size,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=len(actors) * CALLS_IN_FLIGHT_PER_SCORER),
            num_cpus=FORWARD_NUM_CPUS,
        )

    def score_records(self, student_or_checkpoint: Student | str | Path, records: list[dict[str, Any]]) -> np.ndarray:
        """The scores of a few ``records`` (one scoring batch), from one warm actor in one call.

        What :meth:`score_dataset` computes for them, without a dataset: for a GOLD iteration's dozen
        probes, starting Ray Data's executor took 1.4 to 1.6 s against 0.05 s of scoring.

        Args:
            student_or_checkpoint: The student to score with (see :meth:`set_student`).
            records: Records with the task's input fields.

        Returns:
            One float per record (NaN where a field is missing).
        """
        self.set_student(student_or_checkpoint)
        names = [*self.task.field_names, self.task.target_key]
        batch = {k: np.array([r.get(k) for r in records], dtype=object) for k in names}
        out = ray.get(self._start_actors()[0].score_batch.remote(batch, self._version, [self._weights]))
        return np.asarray(out[SCORE_COLUMN], dtype=np.float64)

    def evaluate(self, student: Student, records: list[dict[str, Any]]) -> dict[str, Any]:
        """``student``'s metrics on ``records`` (:func:`gold_ray.student.evaluation.evaluate_student`),
        computed on a warm actor: no process starts for an evaluation, and the actors' resources are
        the only ones an evaluation needs."""
        self.set_student(student)
        actor = self._start_actors()[0]
        return ray.get(actor.evaluate.remote(list(records), self._version, [self._weights]))

    def _stop_actors(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def close(self) -> None:
        """Kill the actors and release the weights; a later :meth:`set_student` starts afresh."""
        self._stop_actors()
        self._weights = self._skeleton = self._key = self._architecture = None

    def __enter__(self) -> ScorerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_dataset(
    ds: ray.data.Dataset, cfg: RunConfig, checkpoint_dir: str, task: str | TaskSpec,
    pool: ScorerPool | None = None,
) -> ray.data.Dataset:
    """``ds`` with a ``score`` column computed by a pool of :class:`EnergyScorer` actors (lazy).

    Without ``pool``, a Ray Data actor pool started for this dataset, of ``resources.scorer_min_actors``
    (default: the maximum) to ``scorer_max_actors`` actors, each loading ``checkpoint_dir``. With
    ``pool``, its warm actors, after ``pool.set_student(checkpoint_dir)``. The score, its
    temperature and the text-to-text mode come from the ``strategy`` section.

    Args:
        ds: Rows with the task's input fields (and ``reject_reason``, if any row is rejected).
        cfg: The run config.
        checkpoint_dir: The student checkpoint to score with.
        task: The task (name, YAML path or spec); a pool scores for its own.
        pool: The run's :class:`ScorerPool`, or None.

    Returns:
        The lazily mapped dataset.
    """
    if pool is not None:
        pool.set_student(checkpoint_dir)
        return pool.score_dataset(ds)
    r, s = cfg.resources, cfg.strategy
    return ds.map_batches(
        EnergyScorer,
        compute=ray.data.ActorPoolStrategy(min_size=r.scorer_min_actors or r.scorer_max_actors,
                                           max_size=r.scorer_max_actors),
        batch_size=r.scorer_batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "checkpoint_dir": str(checkpoint_dir),
            "task_name_or_path": task,
            "score": s.score,
            "temperature": s.energy_temperature,
            "mode": s.energy_mode,
        },
        **scorer_resources(cfg),
    )
