"""Student training on Ray Train V2: data-parallel (DDP) fine-tuning with checkpoints and retries.

:func:`train_student_on_ray` runs one training job with ``ray.train.torch.TorchTrainer``;
:func:`make_ray_train_fn` adapts it to the runtime's ``train`` step (:mod:`actors.runtime`).

Each worker runs :func:`gold_ray.student.training.fit`, the same loop as the in-process runtime, with its
DDP-wrapped model and its rank: every worker holds all rows, draws the same batch order and takes
its own slice of each *global* batch, so the result does not depend on the worker count. Why not a
Ray Data split: ``streaming_split`` hands blocks to whichever worker asks first, so which rows a
worker sees is not reproducible. A generated data set is small (thousands of short texts).

Per worker:

1. Load the student: from the latest Ray Train checkpoint when the job is resuming (after a
   worker failure, or a second call with the same ``storage_path``/``name``), else from
   ``student_dir`` (continued training), else fresh from ``model_path``.
2. Read every training row from the ``train`` Ray dataset, back in the order given.
3. Train with the recipe; after an epoch (at most one per ``resources.train_checkpoint_every_s``)
   rank 0 reports a checkpoint holding the student
   (``student/``), the optimiser and scheduler state with the best weights so far
   (``optimizer.pt``) and the loop's state (``train_state.json``).
4. At the end, rank 0 reports a last checkpoint with the weights the job returns (the best epoch's,
   when a validation split chose it), marked ``finished``.

MLflow: when ``mlflow_parent`` names a run, the driver creates a nested child run and rank 0
logs per-step loss and learning rate plus per-epoch loss into it; the driver closes it with the
job's outcome. Retried attempts log into the same child run.

Requires ``student_dir``, ``model_path``, ``storage_path`` and ``out_dir`` to be readable and
writable from every worker node (one machine, or shared storage on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gold_ray.config import RunConfig, StudentConfig
from gold_ray.run.faults import fault_point
from gold_ray.run.tasks import load_task
from gold_ray.student.losses import loss_fn
from gold_ray.student.model import Student, build_student, load_student
from gold_ray.student.training import FitState, Recipe, fit, planned_steps

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
"""In each checkpoint: the loop's :class:`~gold_ray.student.training.FitState`, ``resumed_from_epoch`` and
``finished``."""

OPTIM_FILE = "optimizer.pt"
"""In each checkpoint: optimiser and scheduler state and the best weights so far (None when they
are the checkpoint's own), so a resumed job continues exactly."""

STUDENT_SUBDIR = "student"
"""In each checkpoint: the student in HF format (``Student.save``)."""

_INDEX = "_gold_ray_row"  # column that carries each record's position through Ray Data

PROGRESS_EVERY_S = 0.5
"""Least seconds between two writes of rank 0's step count, and between two reads of it by the driver."""


def run_name_for(
    records: Sequence[dict], student: Student, settings: dict[str, Any], prefix: str = "train"
) -> str:
    """A Ray Train run name that identifies one training call by its content.

    A driver that restarts and repeats the same call (same start weights, records and settings)
    gets the same name, so Ray Train resumes its checkpoints; any other call gets a new name.

    Args:
        records: The training records, in order (validation records go into ``settings``).
        student: The student before training.
        settings: Recipe, seeds ….
        prefix: Start of the name.

    Returns:
        ``{prefix}-{16 hex digits}``.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for rec in records:
        digest.update(json.dumps(rec, sort_keys=True, default=str).encode())
    for name, tensor in sorted(student.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"{prefix}-{digest.hexdigest()}"


def _nothing_to_train(records: Sequence[dict], recipe: Recipe) -> bool:
    return len(records) == 0 or recipe.epochs <= 0


# ---- the per-worker loop -----------------------------------------------------------------------


def worker_threads(workers_on_node: int) -> int:
    """Torch threads for one of ``workers_on_node`` training workers: the node's cores shared among them.

    Cores are the physical ones this process may run on (torch's own default in a fresh process),
    not the CPUs Ray booked for the worker; ``resources.train_threads_per_worker`` pins another count.
    """
    import os

    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(usable, psutil.cpu_count(logical=False) or usable)
    return max(1, cores // max(1, workers_on_node))


def _load_worker_student(config: dict[str, Any], checkpoint_dir: Path | None, device: str) -> Student:
    task = load_task(config["task"])
    if checkpoint_dir is not None:
        return load_student(checkpoint_dir / STUDENT_SUBDIR, task, device=device)
    if config["student_dir"]:
        return load_student(config["student_dir"], task, device=device)
    cfg = StudentConfig.model_validate(config["student_cfg"])
    return build_student(task, cfg, config["model_path"], seed=config["seed"], device=device)


def _ordered_rows(shard: Any) -> list[dict[str, Any]]:
    rows = sorted(shard.iter_rows(), key=lambda r: r[_INDEX])
    return [{k: v for k, v in row.items() if k != _INDEX} for row in rows]


def _save_checkpoint(out: Path, student: Student, optimizer: Any, scheduler: Any, best: Any,
                     state: dict[str, Any]) -> None:
    student.save(out / STUDENT_SUBDIR)
    torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "best": best}, out / OPTIM_FILE)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop of one worker (see the module docstring).

    Args:
        config: ``train_loop_config`` built by :func:`train_student_on_ray`.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"] or worker_threads(ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    recipe, seed = Recipe(**config["recipe"]), int(config["seed"])
    loss_fn(recipe.loss)  # fail on a bad loss name before any work

    saved: dict[str, Any] = {}
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            saved = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            student = _load_worker_student(config, ckpt, str(device))
            resume = {"state": saved["fit"], **torch.load(ckpt / OPTIM_FILE, map_location="cpu", weights_only=True)}
    else:
        student = _load_worker_student(config, None, str(device))
    resumed_from = int(saved.get("fit", {}).get("epoch", 0))
    if saved.get("finished"):
        # A finished job asked again: its result stands.
        _report(rank, student, saved, None, None, None, {**saved["result"], "workers": world}, checkpoint=False)
        return

    rows = _ordered_rows(ray.train.get_dataset_shard("train"))
    model = ray.train.torch.prepare_model(student.model)
    mlflow_run = config.get("mlflow")
    steps: list[tuple[int, float, float]] = []

    progress_file = config.get("progress_file") if rank == 0 else None
    planned = planned_steps(recipe, len(rows), student.batch_size)
    written = [0.0]

    def on_step(info: dict[str, Any]) -> None:
        fault_point("train.step", rank=rank, epoch=info["epoch"], batch=info["batch"])
        steps.append((info["step"], info["loss"], info["lr"]))
        if progress_file and time.monotonic() - written[0] >= PROGRESS_EVERY_S:
            written[0] = time.monotonic()
            _write_progress(Path(progress_file), info["step"], planned)

    every_s, checkpointed = float(config["checkpoint_every_s"]), [time.monotonic()]

    def on_epoch(state: FitState, optimizer: Any, scheduler: Any, best: Any) -> None:
        if rank == 0 and mlflow_run:
            _log_epoch(mlflow_run, steps, state)
        steps.clear()
        # A report waits for the Ray Train controller's next poll of the worker (2 s by default), so
        # an epoch reports only to checkpoint. Every rank must report as often as the others:
        # rank 0's clock decides for all.
        if not _rank_zero_says(time.monotonic() - checkpointed[0] >= every_s, world, device):
            return
        _report(rank, student, {"fit": state.to_dict(), "resumed_from_epoch": resumed_from},
                optimizer, scheduler, best, {"epoch": state.epoch, "loss": state.loss, "workers": world})
        checkpointed[0] = time.monotonic()

    result = fit(student, rows, recipe, seed=seed, val_records=config.get("val_records") or (), model=model,
                 world_size=world, rank=rank, resume=resume, on_epoch=on_epoch, on_step=on_step)
    result = {**{k: v for k, v in result.items() if k != "seconds"}, "threads": torch.get_num_threads()}
    # The last checkpoint holds the weights the job returns (the best epoch's, with validation).
    _report(rank, student, {"fit": saved.get("fit") or {}, "resumed_from_epoch": resumed_from, "finished": True,
                            "result": result}, None, None, None, {**result, "workers": world})


def _rank_zero_says(flag: bool, world: int, device: Any) -> bool:
    """Rank 0's ``flag``, on every rank (a broadcast over the DDP process group when there are several)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)  # NCCL, the GPU workers' backend, sends device tensors
    dist.broadcast(value, src=0)
    return bool(value.item())


def _write_progress(path: Path, step: int, planned: int) -> None:
    """Rank 0's step count for the driver (:func:`_watch_progress`); written atomically, never fatal."""
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"step": step, "planned": planned}), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # progress is a courtesy; training goes on


def _watch_progress(path: Path, report: Callable[[int, int], None]) -> Callable[[], None]:
    """Read rank 0's step count every :data:`PROGRESS_EVERY_S` in a thread and pass it to ``report``;
    returns the function that stops the thread."""
    import threading

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not written yet
            report(int(data["step"]), int(data["planned"]))

    thread = threading.Thread(target=watch, name="gold-ray-train-progress", daemon=True)
    thread.start()

    def stop_watching() -> None:
        stop.set()
        thread.join(timeout=5)

    return stop_watching


def _report(rank: int, student: Student, state: dict[str, Any], optimizer: Any, scheduler: Any, best: Any,
            metrics: dict[str, Any], checkpoint: bool = True) -> None:
    import ray.train

    # Reported metrics are scalars; the curve travels in the checkpoint's state.
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0 and checkpoint:
            _save_checkpoint(Path(tmp), student, optimizer, scheduler, best, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)


def _log_epoch(run: dict[str, str], steps: list[tuple[int, float, float]], state: FitState) -> None:
    from gold_ray.reporting.tracking import log_metric_rows

    rows: list[tuple[int, dict[str, Any]]] = [
        (step, {"train.step_loss": loss, "train.lr": lr}) for step, loss, lr in steps
    ]
    point = state.curve[-1] if state.curve else {}
    rows.append((state.epoch, {f"train.epoch_{k}": v for k, v in point.items() if k != "epoch"}))
    try:
        log_metric_rows(run["tracking_uri"], run["run_id"], rows)
    except Exception as err:  # tracking must never stop training
        logger.warning("MLflow logging of the training run failed: %s", err)


# ---- the driver side ---------------------------------------------------------------------------


def train_student_on_ray(
    student_dir: str | None,
    model_path: str,
    task_name: str,
    records: list[dict],
    *,
    cfg: RunConfig,
    recipe: Recipe,
    val_records: Sequence[dict] = (),
    out_dir: str,
    storage_path: str,
    name: str,
    mlflow_parent: dict | None = None,
    on_progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Train a student with Ray Train V2 and save the result in HF format to ``out_dir``.

    A second call with the same ``storage_path`` and ``name`` resumes from that run's latest
    checkpoint and trains only the epochs still missing (none when the run had finished).

    Args:
        student_dir: A saved student to continue training; None builds a fresh one from
            ``model_path`` with ``cfg.student`` and ``cfg.seed``.
        model_path: The resolved student model (used when ``student_dir`` is None).
        task_name: Task name or task YAML path.
        records: Training records (task input fields and target).
        cfg: The run config: ``resources`` (workers, CPUs, GPU) and ``seed``.
        recipe: How to train (:class:`~gold_ray.student.training.Recipe`).
        val_records: Synthetic validation records (early stopping and the best epoch).
        out_dir: Where the trained student is written (replaced if present).
        storage_path: Ray Train storage (checkpoints), a local folder or URI.
        name: Ray Train run name inside ``storage_path``.
        mlflow_parent: ``{"tracking_uri", "run_id"}``: log training into a nested child run.
        on_progress: Told rank 0's optimiser steps done of planned while the job runs, as
            ``on_progress("steps", done, planned, phase=recipe name)`` (through a small file beside
            ``out_dir``, which every worker can write).

    Returns:
        What :func:`gold_ray.student.training.fit` returns, plus ``seconds``, ``workers``,
        ``threads`` (torch threads per worker) and ``resumed_from_epoch``; loss NaN when there was
        nothing to train on.

    Raises:
        ray.train.TrainingFailedError: training failed more often than ``FailureConfig`` allows.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    res = cfg.resources
    if _nothing_to_train(records, recipe):
        task = load_task(task_name)
        source = (
            load_student(student_dir, task)
            if student_dir
            else build_student(task, cfg.student, model_path, seed=cfg.seed)
        )
        shutil.rmtree(out, ignore_errors=True)
        source.save(out)
        return {"loss": math.nan, "epochs": 0, "steps": 0, "seconds": time.perf_counter() - start,
                "workers": 0, "resumed_from_epoch": 0, "recipe": recipe.name, "curve": []}

    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    child_run = None
    if mlflow_parent:
        from gold_ray.reporting.tracking import start_child_run

        child_run = {
            "tracking_uri": mlflow_parent["tracking_uri"],
            "run_id": start_child_run(mlflow_parent, name),
        }
    config = {
        "task": task_name,
        "model_path": model_path,
        "student_dir": student_dir,
        "student_cfg": cfg.student.model_dump(mode="json"),
        "seed": cfg.seed,
        "threads": res.train_threads_per_worker,
        "checkpoint_every_s": res.train_checkpoint_every_s,
        "recipe": recipe.to_dict(),
        "val_records": list(val_records),
        "mlflow": child_run,
        "progress_file": str(out.with_name(f"{out.name}.progress.json")) if on_progress else None,
    }
    dataset = ray.data.from_items([{**rec, _INDEX: i} for i, rec in enumerate(records)])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.train_workers,
            use_gpu=res.train_use_gpu,
            resources_per_worker={"CPU": res.train_cpus_per_worker, **res.train_resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=_storage_uri(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": dataset},
        # Every worker reads all rows and slices each global batch itself (module docstring).
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    status = "FAILED"
    stop_watching = None
    if on_progress is not None:
        student_cfg = cfg.student
        on_progress("steps", 0, planned_steps(recipe, len(records), student_cfg.batch_size), phase=recipe.name)
        progress_file = Path(config["progress_file"])
        progress_file.unlink(missing_ok=True)
        stop_watching = _watch_progress(
            progress_file, lambda step, planned: on_progress("steps", step, planned, phase=recipe.name))
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"internal error: Ray Train run {name!r} finished without a checkpoint")
        with result.checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(ckpt / STUDENT_SUBDIR, out)
        status = "FINISHED"
    finally:
        if stop_watching is not None:
            stop_watching()
            Path(config["progress_file"]).unlink(missing_ok=True)
        if child_run is not None:
            from gold_ray.reporting.tracking import end_child_run

            end_child_run(child_run["tracking_uri"], child_run["run_id"], status)
    return {**state["result"], "seconds": time.perf_counter() - start, "workers": res.train_workers,
            "resumed_from_epoch": state.get("resumed_from_epoch", 0)}


def _storage_uri(storage_path: str) -> str:
    # Ray Train wants an absolute local path or a URI.
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


TrainHook = Callable[..., dict[str, Any]]


def make_ray_train_fn(
    cfg: RunConfig,
    task_name: str,
    model_path: str,
    work_dir: str | Path,
    *,
    mlflow_parent: dict | Callable[[], dict | None] | None = None,
    keep_runs: bool = False,
) -> TrainHook:
    """A ``train(student, records, recipe, val_records=(), on_progress=None) -> metrics`` step backed by Ray Train.

    The step saves the given student to ``work_dir``, trains it with :func:`train_student_on_ray`
    and loads the trained weights back into the same student object, so the loop goes on with it.
    The Ray Train run is named after the call's content (:func:`run_name_for`): a restarted
    driver that repeats an interrupted call resumes that call's checkpoints.

    Args:
        cfg: The run config.
        task_name: Task name or task YAML path.
        model_path: The resolved student model.
        work_dir: Scratch folder for the input and output students and Ray Train storage.
        mlflow_parent: ``{"tracking_uri", "run_id"}`` (or a callable returning it, read at each
            call) to nest each training job's MLflow run under.
        keep_runs: Keep each finished job's Ray Train storage (checkpoints) instead of deleting it.

    Returns:
        The train step.
    """
    work = Path(work_dir).resolve()

    def train(student: Student, records: list[dict], recipe: Recipe, val_records: Sequence[dict] = (),
              on_progress: Callable[..., None] | None = None) -> dict:
        if _nothing_to_train(records, recipe):
            return {"loss": math.nan, "steps": 0, "seconds": 0.0, "epochs": 0, "workers": 0,
                    "recipe": recipe.name, "curve": []}
        settings = {"recipe": recipe.to_dict(), "seed": cfg.seed, "workers": cfg.resources.train_workers,
                    "val": [r.get("id") for r in val_records]}
        name = run_name_for(records, student, settings)
        src, dst = work / "inputs" / name, work / "outputs" / name
        shutil.rmtree(src, ignore_errors=True)
        student.save(src)
        parent = mlflow_parent() if callable(mlflow_parent) else mlflow_parent
        metrics = train_student_on_ray(
            str(src), model_path, task_name, records, cfg=cfg, recipe=recipe, val_records=val_records,
            out_dir=str(dst), storage_path=str(work / "ray_train"), name=name, mlflow_parent=parent,
            on_progress=on_progress,
        )
        trained = load_student(dst, student.task, device="cpu")
        student.model.load_state_dict(trained.model.state_dict())
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        if not keep_runs:
            shutil.rmtree(work / "ray_train" / name, ignore_errors=True)
        return metrics

    return train
