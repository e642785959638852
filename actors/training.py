"""Student training on Ray Train V2: one data-parallel (DDP) worker group that takes training orders.

A run's trainings (one per iteration, then the final recipes) are *orders* sent to one Ray Train
worker group, started once with the run's first ``TorchTrainer.fit()`` and kept until the run
ends (:class:`TrainingWorkers`). Ray Train's start-up (controller, worker group, placement group,
synchronisation actor: 10 s measured on 2 cores, plus loading the student) is then paid once per run, not
once per training. The student's weights and the records go to the workers, and the trained
weights come back, through Ray's object store; nothing is written to disk on the way but Ray
Train's checkpoints.

::

    driver (TrainingWorkers.train)          OrderBook actor            Ray Train workers (DDP)
      put(weights), submit(order) ────────► next_order ─────────────► load weights, fit(), report
      wait(result) ◄─────────────────────── finish(result, weights) ◄─ rank 0

Each worker runs :func:`gold_ray.student.training.fit`, the same loop as the in-process runtime, with its
DDP-wrapped model and its rank: every worker holds all rows, draws the same batch order and takes
its own slice of each *global* batch, so the result does not depend on the worker count. Why not a
Ray Data split: ``streaming_split`` hands blocks to whichever worker asks first, so which rows a
worker sees is not reproducible. A generated data set is small (thousands of short texts).

Failures. After an epoch (at most one per ``resources.train_checkpoint_every_s``) rank 0 reports a
checkpoint holding the student (``student/``), the optimiser and scheduler state with the best
weights so far (``optimizer.pt``) and the loop's state (``train_state.json``, naming the order);
at the end of an order, a last checkpoint with the weights it returns, marked ``finished``. When a
worker dies, Ray Train restarts the group (``FailureConfig``); the order book still holds the
order, and the new workers resume it from the latest checkpoint when that checkpoint names it. A
driver that restarts starts a group with the same Ray Train run name, so the same holds for the
order it repeats; an order whose checkpoint says ``finished`` is answered without training.

MLflow: when ``mlflow_parent`` names a run, the driver creates a nested child run per order and
rank 0 logs per-step loss and learning rate plus per-epoch loss into it; the driver closes it with
the order's outcome. Retried attempts log into the same child run.

Requires ``model_path`` and the Ray Train storage to be readable and writable from every worker
node (one machine, or shared storage on a cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from actors.connect import on_this_node
from gold_ray.allocator import KEEP_FREED_MEMORY_ENV
from gold_ray.config import RunConfig
from gold_ray.devices import shared_threads
from gold_ray.run.faults import fault_point
from gold_ray.run.tasks import load_task
from gold_ray.student.losses import loss_fn
from gold_ray.student.model import Student, build_student, load_student
from gold_ray.student.training import FitState, Recipe, cpu_weights, fit, planned_steps

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
"""In each checkpoint: the order's id, the loop's :class:`~gold_ray.student.training.FitState`,
``resumed_from_epoch`` and ``finished`` (with the order's ``result``)."""

OPTIM_FILE = "optimizer.pt"
"""In each checkpoint: optimiser and scheduler state and the best weights so far (None when they
are the checkpoint's own), so a resumed order continues exactly."""

STUDENT_SUBDIR = "student"
"""In each checkpoint: the student in HF format (``Student.save``)."""

PROGRESS_EVERY_S = 0.5
"""Least seconds between two writes of rank 0's step count, and between two reads of it by the driver."""

WAIT_POLL_S = 0.5
"""How often the driver, waiting for an order, checks that the worker group is still running."""

CLOSE_WAIT_S = 60.0
"""How long closing waits for the workers to return before leaving them to die with the process."""


def run_name_for(
    records: Sequence[dict], student: Student, settings: dict[str, Any], prefix: str = "train"
) -> str:
    """An order id that identifies one training call by its content.

    A driver that restarts and repeats the same call (same start weights, records and settings)
    gets the same id, so the workers resume its checkpoint; any other call gets a new id.

    Args:
        records: The training records, in order (validation records go into ``settings``).
        student: The student before training.
        settings: Recipe, seeds ….
        prefix: Start of the id.

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


# ---- the order book: the queue between the driver and the workers ---------------------------------


class OrderBook:
    """Training orders in, results out; a Ray actor (async) between the driver and the worker group.

    An order stays open until rank 0 finishes it, so a worker group that Ray Train restarts after a
    failure is handed the same order again. Every rank asks for the next order after the last one it
    served; all ranks get the same orders in the same sequence.
    """

    def __init__(self) -> None:
        self._open: dict[int, dict[str, Any]] = {}
        self._results: dict[int, dict[str, Any]] = {}
        self._seq = 0
        self._closed = False
        self._changed = asyncio.Condition()

    async def submit(self, order: dict[str, Any]) -> int:
        """Add ``order`` (its ``seq`` is set here) and return its sequence number."""
        async with self._changed:
            self._seq += 1
            self._open[self._seq] = {**order, "seq": self._seq}
            self._changed.notify_all()
            return self._seq

    async def next_order(self, after: int) -> dict[str, Any] | None:
        """The first open order numbered above ``after``; waits for one; None once closed."""
        async with self._changed:
            while True:
                later = [seq for seq in self._open if seq > after]
                if later:
                    return self._open[min(later)]
                if self._closed:
                    return None
                await self._changed.wait()

    async def finish(self, seq: int, result: dict[str, Any], weights: dict[str, Any] | None) -> None:
        """Rank 0's answer to order ``seq``: its metrics and trained weights (repeats are ignored)."""
        async with self._changed:
            if seq in self._open:
                del self._open[seq]
                self._results[seq] = {"result": result, "weights": weights}
                self._changed.notify_all()

    async def result(self, seq: int) -> dict[str, Any]:
        """Order ``seq``'s answer once it is finished (handed out once)."""
        async with self._changed:
            while seq not in self._results:
                await self._changed.wait()
            return self._results.pop(seq)

    async def close(self) -> None:
        """No more orders: workers that ask get None and return."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


# ---- the per-worker loop -----------------------------------------------------------------------


def _save_checkpoint(out: Path, student: Student, optimizer: Any, scheduler: Any, best: Any,
                     state: dict[str, Any]) -> None:
    student.save(out / STUDENT_SUBDIR)
    torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "best": best}, out / OPTIM_FILE)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop of one worker: serve orders until the order book closes (module docstring).

    Args:
        config: ``train_loop_config`` built by :class:`TrainingWorkers`.
    """
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"] or shared_threads(ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    task = load_task(config["task"])
    from gold_ray.config import StudentConfig

    # The skeleton every order loads its weights into; built once, DDP-wrapped once.
    student = build_student(task, StudentConfig.model_validate(config["student_cfg"]), config["model_path"],
                            seed=config["seed"], device=str(device))
    model = ray.train.torch.prepare_model(student.model)
    checkpoint = ray.train.get_checkpoint()
    worker = _Worker(config, student, model, rank, world, device, checkpoint)
    orders = config["orders"]
    after = -1
    while (order := ray.get(orders.next_order.remote(after))) is not None:
        after = order["seq"]
        result, weights = worker.serve(order)
        if rank == 0:
            ray.get(orders.finish.remote(order["seq"], result, weights))


class _Worker:
    """One worker's state across orders: the student, its DDP wrapper and the checkpoint it started from."""

    def __init__(self, config: dict[str, Any], student: Student, model: Any, rank: int, world: int, device: Any,
                 checkpoint: Any) -> None:
        self.config, self.student, self.model = config, student, model
        self.rank, self.world, self.device = rank, world, device
        self.checkpoint = checkpoint  # only the first order after a (re)start may resume from it
        self.saved: dict[str, Any] = {}
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt:
                self.saved = json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))

    def _load_checkpoint(self, saved: dict[str, Any], with_optimizer: bool) -> dict[str, Any] | None:
        with self.checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            stored = load_student(ckpt / STUDENT_SUBDIR, self.student.task, device="cpu")
            self.student.model.load_state_dict(stored.model.state_dict())
            if not with_optimizer:
                return None
            return {"state": saved["fit"], **torch.load(ckpt / OPTIM_FILE, map_location="cpu", weights_only=True)}

    def serve(self, order: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Train for ``order``; returns the metrics and, on rank 0, the trained weights."""
        import ray

        recipe, seed = Recipe(**order["recipe"]), int(order["seed"])
        saved = self.saved if self.saved.get("order") == order["id"] else {}
        self.saved = {}
        resume = None
        if saved.get("finished"):
            # An order finished before the restart, asked again: its result stands.
            self._load_checkpoint(saved, with_optimizer=False)
            return {**saved["result"], "workers": self.world}, cpu_weights(self.student) if self.rank == 0 else None
        if saved:
            resume = self._load_checkpoint(saved, with_optimizer=True)
        else:
            self.student.model.load_state_dict(ray.get(order["weights"][0]))
        resumed_from = int(saved.get("fit", {}).get("epoch", 0))
        rows = ray.get(order["records"][0])
        result = self._fit(order, recipe, seed, rows, resume, resumed_from)
        # The last checkpoint holds the weights the order returns (the best epoch's, with validation).
        _report(self.rank, self.student, {"order": order["id"], "fit": saved.get("fit") or {},
                                          "resumed_from_epoch": resumed_from, "finished": True, "result": result},
                None, None, None, {**result, "workers": self.world})
        return {**result, "workers": self.world}, cpu_weights(self.student) if self.rank == 0 else None

    def _fit(self, order: dict[str, Any], recipe: Recipe, seed: int, rows: list[dict[str, Any]],
             resume: dict[str, Any] | None, resumed_from: int) -> dict[str, Any]:
        rank, world, device = self.rank, self.world, self.device
        mlflow_run = order.get("mlflow")
        steps: list[tuple[int, float, float]] = []
        progress_file = order.get("progress_file") if rank == 0 else None
        planned = planned_steps(recipe, len(rows), self.student.batch_size)
        written = [0.0]

        def on_step(info: dict[str, Any]) -> None:
            fault_point("train.step", rank=rank, epoch=info["epoch"], batch=info["batch"])
            steps.append((info["step"], info["loss"], info["lr"]))
            if progress_file and time.monotonic() - written[0] >= PROGRESS_EVERY_S:
                written[0] = time.monotonic()
                _write_progress(Path(progress_file), info["step"], planned)

        every_s, checkpointed = float(self.config["checkpoint_every_s"]), [time.monotonic()]

        def on_epoch(state: FitState, optimizer: Any, scheduler: Any, best: Any) -> None:
            if rank == 0 and mlflow_run:
                _log_epoch(mlflow_run, steps, state)
            steps.clear()
            # A report waits for the Ray Train controller's next poll of the worker, so an epoch
            # reports only to checkpoint. Every rank must report as often as the others: rank 0's
            # clock decides for all.
            if not _rank_zero_says(time.monotonic() - checkpointed[0] >= every_s, world, device):
                return
            _report(rank, self.student, {"order": order["id"], "fit": state.to_dict(),
                                         "resumed_from_epoch": resumed_from},
                    optimizer, scheduler, best, {"epoch": state.epoch, "loss": state.loss, "workers": world})
            checkpointed[0] = time.monotonic()

        result = fit(self.student, rows, recipe, seed=seed, val_records=order.get("val_records") or (),
                     model=self.model, world_size=world, rank=rank, resume=resume, on_epoch=on_epoch,
                     on_step=on_step)
        return {**{k: v for k, v in result.items() if k != "seconds"}, "threads": torch.get_num_threads(),
                "resumed_from_epoch": resumed_from, "worker_pid": os.getpid()}


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
            metrics: dict[str, Any]) -> None:
    import ray.train

    # Reported metrics are scalars; the curve travels in the checkpoint's state.
    metrics = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
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


class TrainingWorkers:
    """A Ray Train worker group that serves training orders until closed (module docstring).

    The group starts with :meth:`start` (or the first :meth:`train`) as one ``TorchTrainer.fit()``
    running in a thread of this process, and holds ``resources.train_workers`` workers until
    :meth:`close`. When the fit fails (more worker failures than ``FailureConfig`` allows), the
    order it was serving raises and the next :meth:`train` starts a new group with the same Ray
    Train run name, which resumes from the latest checkpoint.

    Args:
        cfg: The run config: ``resources`` (workers, CPUs, GPU, checkpoint interval), ``student``, ``seed``.
        task_name: Task name or task YAML path.
        model_path: The resolved student model (the workers build the student's skeleton from it).
        storage_path: Ray Train storage (checkpoints), a local folder or URI.
        name: Ray Train run name inside ``storage_path``.
    """

    def __init__(self, cfg: RunConfig, task_name: str, model_path: str, *, storage_path: str, name: str) -> None:
        self.cfg, self.task_name, self.model_path = cfg, task_name, model_path
        self.storage_path, self.name = storage_path, name
        self._orders: Any = None
        self._thread: threading.Thread | None = None
        self._outcome: dict[str, Any] = {}

    @property
    def running(self) -> bool:
        """Whether the worker group's fit is running (started and not ended)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker group in the background (no-op when it runs)."""
        if self.running:
            return
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer

        self._shutdown()  # the order book of a group that ended (failed) goes with it
        res = self.cfg.resources
        self._orders = ray.remote(num_cpus=0)(OrderBook).options(scheduling_strategy=on_this_node()).remote()
        config = {
            "task": self.task_name,
            "model_path": self.model_path,
            "student_cfg": self.cfg.student.model_dump(mode="json"),
            "seed": self.cfg.seed,
            "threads": res.train_threads_per_worker,
            "checkpoint_every_s": res.train_checkpoint_every_s,
            "orders": self._orders,
        }
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=res.train_workers,
                use_gpu=res.train_use_gpu,
                resources_per_worker={"CPU": res.train_cpus_per_worker, **res.train_resources_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=self.name,
                storage_path=_storage_uri(self.storage_path),
                failure_config=ray.train.FailureConfig(max_failures=res.train_max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                # The workers train in a thread: glibc's settings must be there when they start.
                worker_runtime_env={"env_vars": KEEP_FREED_MEMORY_ENV},
            ),
        )
        outcome: dict[str, Any] = {}
        self._outcome = outcome

        def run() -> None:
            try:
                trainer.fit()
            except BaseException as err:  # noqa: BLE001 - handed to the waiting train() call
                outcome["error"] = err

        self._thread = threading.Thread(target=run, name=f"gold-ray-train-{self.name}", daemon=True)
        self._thread.start()

    def train(self, student: Student, records: list[dict], recipe: Recipe, *, order_id: str,
              val_records: Sequence[dict] = (), mlflow_parent: dict | None = None,
              on_progress: Callable[..., None] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Train ``student``'s weights on ``records`` in the worker group; ``student`` is left as it was.

        Args:
            student: The student to start from (its weights travel through the object store).
            records: Training records (task input fields and target).
            recipe: How to train (:class:`~gold_ray.student.training.Recipe`).
            order_id: Names the order in checkpoints: a repeated id resumes (or returns) its checkpoint.
            val_records: Synthetic validation records (early stopping and the best epoch).
            mlflow_parent: ``{"tracking_uri", "run_id"}``: log training into a nested child run.
            on_progress: Told rank 0's optimiser steps done of planned while the order runs, as
                ``on_progress("steps", done, planned, phase=recipe name)`` (through a small file in
                the Ray Train storage, which every worker can write).

        Returns:
            What :func:`gold_ray.student.training.fit` returns, plus ``workers``, ``threads`` (torch
            threads per worker), ``resumed_from_epoch`` and ``worker_pid`` (rank 0's process, the
            same for every order of a kept group); and the trained weights (CPU tensors).

        Raises:
            ray.train.TrainingFailedError: the worker group failed more often than ``FailureConfig`` allows.
        """
        import ray

        loss_fn(recipe.loss)  # a bad loss name is the caller's error, not a worker failure to retry
        self.start()
        child_run = None
        if mlflow_parent:
            from gold_ray.reporting.tracking import start_child_run

            child_run = {"tracking_uri": mlflow_parent["tracking_uri"],
                         "run_id": start_child_run(mlflow_parent, order_id)}
        progress_file = None
        stop_watching = None
        if on_progress is not None:
            local = Path(self.storage_path)
            local.mkdir(parents=True, exist_ok=True)
            progress_file = local / f"{order_id}.progress.json"
            progress_file.unlink(missing_ok=True)
            planned = planned_steps(recipe, len(records), self.cfg.student.batch_size)
            on_progress("steps", 0, planned, phase=recipe.name)
            stop_watching = _watch_progress(
                progress_file, lambda step, total: on_progress("steps", step, total, phase=recipe.name))
        # The refs travel inside lists, so the workers fetch them when they need them.
        order = {"id": order_id, "recipe": recipe.to_dict(), "seed": self.cfg.seed,
                 "weights": [ray.put(cpu_weights(student))], "records": [ray.put(list(records))],
                 "val_records": list(val_records), "mlflow": child_run,
                 "progress_file": str(progress_file) if progress_file else None}
        status = "FAILED"
        try:
            seq = ray.get(self._orders.submit.remote(order))
            answer = self._wait(self._orders.result.remote(seq))
            status = "FINISHED"
        finally:
            if stop_watching is not None:
                stop_watching()
            if progress_file is not None:
                progress_file.unlink(missing_ok=True)
            if child_run is not None:
                from gold_ray.reporting.tracking import end_child_run

                end_child_run(child_run["tracking_uri"], child_run["run_id"], status)
        return answer["result"], answer["weights"]

    def _wait(self, ref: Any) -> dict[str, Any]:
        import ray

        while True:
            ready, _ = ray.wait([ref], timeout=WAIT_POLL_S)
            if ready:
                return ray.get(ref)
            if not self.running:
                break
        error = self._outcome.get("error")
        self._shutdown()
        if error is not None:
            raise error
        raise RuntimeError(f"internal error: the Ray Train worker group {self.name!r} ended with an order open")

    def close(self) -> None:
        """Let the workers return and the fit end; waits up to :data:`CLOSE_WAIT_S`."""
        if self._orders is None:
            return
        import ray

        # The order book may have died with a failed group: then there is nothing to tell it.
        with contextlib.suppress(Exception):
            ray.get(self._orders.close.remote(), timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=CLOSE_WAIT_S)
            if self._thread.is_alive():
                logger.warning("the Ray Train worker group %s did not stop within %.0f s", self.name, CLOSE_WAIT_S)
        self._shutdown()

    def _shutdown(self) -> None:
        import ray

        if self._orders is not None:
            ray.kill(self._orders)
        self._orders, self._thread = None, None


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
    """Train a student with a worker group of its own and save the result in HF format to ``out_dir``.

    One order on one :class:`TrainingWorkers`, closed at the end. A second call with the same
    ``storage_path`` and ``name`` resumes from that run's latest checkpoint and trains only the
    epochs still missing (none when the run had finished).

    Args:
        student_dir: A saved student to continue training; None builds a fresh one from
            ``model_path`` with ``cfg.student`` and ``cfg.seed``.
        model_path: The resolved student model.
        task_name: Task name or task YAML path.
        records: Training records (task input fields and target).
        cfg: The run config: ``resources`` (workers, CPUs, GPU) and ``seed``.
        recipe: How to train (:class:`~gold_ray.student.training.Recipe`).
        val_records: Synthetic validation records (early stopping and the best epoch).
        out_dir: Where the trained student is written (replaced if present).
        storage_path: Ray Train storage (checkpoints), a local folder or URI.
        name: Ray Train run name inside ``storage_path`` (and the order's id).
        mlflow_parent: ``{"tracking_uri", "run_id"}``: log training into a nested child run.
        on_progress: As for :meth:`TrainingWorkers.train`.

    Returns:
        What :meth:`TrainingWorkers.train` returns, plus ``seconds``; loss NaN when there was
        nothing to train on.

    Raises:
        ray.train.TrainingFailedError: training failed more often than ``FailureConfig`` allows.
    """
    start = time.perf_counter()
    task = load_task(task_name)
    student = load_student(student_dir, task) if student_dir else build_student(task, cfg.student, model_path,
                                                                               seed=cfg.seed)
    out = Path(out_dir)
    if _nothing_to_train(records, recipe):
        metrics: dict[str, Any] = {"loss": math.nan, "epochs": 0, "steps": 0, "workers": 0, "resumed_from_epoch": 0,
                                   "recipe": recipe.name, "curve": []}
    else:
        workers = TrainingWorkers(cfg, task_name, model_path, storage_path=storage_path, name=name)
        try:
            metrics, weights = workers.train(student, records, recipe, order_id=name, val_records=val_records,
                                             mlflow_parent=mlflow_parent, on_progress=on_progress)
        finally:
            workers.close()
        student.model.load_state_dict(weights)
    shutil.rmtree(out, ignore_errors=True)
    student.save(out)
    return {**metrics, "seconds": time.perf_counter() - start}


def _storage_uri(storage_path: str) -> str:
    # Ray Train wants an absolute local path or a URI.
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


class RayTrainStep:
    """The loop's ``train(student, records, recipe, val_records=(), on_progress=None) -> metrics`` on Ray Train.

    Every call is an order to one :class:`TrainingWorkers` kept for the run (``keep_workers``) or
    started and closed per call; the trained weights come back into the same student object, so the
    loop goes on with it. The order is named after the call's content (:func:`run_name_for`): a
    restarted driver that repeats an interrupted call resumes that call's checkpoint.

    Args:
        cfg: The run config.
        task_name: Task name or task YAML path.
        model_path: The resolved student model.
        work_dir: The Ray Train storage (checkpoints and progress files).
        mlflow_parent: ``{"tracking_uri", "run_id"}`` (or a callable returning it, read at each
            call) to nest each training's MLflow run under.
        keep_workers: Keep the worker group (and the resources it holds) between calls until
            :meth:`close`; False starts one per call (Ray Train's start-up every time).
    """

    RUN_NAME = "workers"
    """The worker group's Ray Train run name inside ``work_dir``; a restarted driver reuses it."""

    def __init__(self, cfg: RunConfig, task_name: str, model_path: str, work_dir: str | Path, *,
                 mlflow_parent: dict | Callable[[], dict | None] | None = None, keep_workers: bool = True) -> None:
        self.cfg, self.keep_workers, self.mlflow_parent = cfg, keep_workers, mlflow_parent
        self.work = Path(work_dir).resolve()
        self.workers = TrainingWorkers(cfg, task_name, model_path, storage_path=str(self.work), name=self.RUN_NAME)

    def start(self) -> None:
        """Start the worker group now (it would start with the first call), when it is kept."""
        if self.keep_workers:
            self.workers.start()

    def __call__(self, student: Student, records: list[dict], recipe: Recipe, val_records: Sequence[dict] = (),
                 on_progress: Callable[..., None] | None = None) -> dict[str, Any]:
        """Train ``student`` in place; returns the metrics of :meth:`TrainingWorkers.train` and ``seconds``."""
        start = time.perf_counter()
        if _nothing_to_train(records, recipe):
            return {"loss": math.nan, "steps": 0, "seconds": 0.0, "epochs": 0, "workers": 0,
                    "recipe": recipe.name, "curve": []}
        settings = {"recipe": recipe.to_dict(), "seed": self.cfg.seed, "workers": self.cfg.resources.train_workers,
                    "val": [r.get("id") for r in val_records]}
        parent = self.mlflow_parent() if callable(self.mlflow_parent) else self.mlflow_parent
        try:
            metrics, weights = self.workers.train(student, records, recipe, order_id=run_name_for(records, student,
                                                                                                 settings),
                                                  val_records=val_records, mlflow_parent=parent,
                                                  on_progress=on_progress)
        finally:
            if not self.keep_workers:
                self.workers.close()
        student.model.load_state_dict(weights)
        return {**metrics, "seconds": time.perf_counter() - start}

    def close(self) -> None:
        """Stop the worker group."""
        self.workers.close()
