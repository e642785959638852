"""Student training on Ray Train V2: data-parallel (DDP) fine-tuning with checkpoints and retries.

:func:`train_student_on_ray` runs one training job with ``ray.train.torch.TorchTrainer``;
:func:`make_ray_train_fn` adapts it to the ``train`` hook of :class:`gold_ray.loop.Distiller`.

What a training job does, per worker:

1. Load the student: from the latest Ray Train checkpoint when the job is resuming (after a
   worker failure, or a second call with the same ``storage_path``/``name``), else from
   ``student_dir`` (continued training), else fresh from ``model_path``.
2. Read every training row from the ``train`` Ray dataset and put them back in the order given.
3. Each epoch, draw the batch order from ``numpy.random.default_rng(seed)`` exactly as
   :meth:`gold_ray.student.Student.fit` does, cut each *global* batch of ``student.batch_size``
   rows into one contiguous slice per worker, and step AdamW (same parameter groups, clipping at
   norm 1 and learning-rate schedule as ``Student.fit``) on the DDP-averaged gradients.
4. After each epoch, report the loss; rank 0 attaches a checkpoint with the student in HF format
   (``student/``), the optimiser and scheduler state and ``train_state.json`` (epochs done).

Why each worker reads the *whole* dataset instead of a Ray Data split: ``streaming_split`` hands
blocks to whichever worker asks first, so which rows a worker sees is not reproducible, and a run
with N workers would not see the same global batches as a run with one. Here every worker holds
the same rows (a generated data set is small: thousands of short texts) and takes its own slice of
each global batch, so the result does not depend on the worker count (see :func:`local_slice`).

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
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gold_ray.config import RunConfig, StudentConfig
from gold_ray.losses import loss_fn
from gold_ray.student import Student, build_student, load_student
from gold_ray.tasks import load_task

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
"""In each checkpoint: ``{"epoch": epochs done, "loss", "steps", "resumed_from_epoch"}``."""

OPTIM_FILE = "optimizer.pt"
"""In each checkpoint: optimiser and scheduler state, so a resumed job continues exactly."""

STUDENT_SUBDIR = "student"
"""In each checkpoint: the student in HF format (``Student.save``)."""

_INDEX = "_gold_ray_row"  # column that carries each record's position through Ray Data


# ---- pure helpers (no Ray) ---------------------------------------------------------------------


def local_slice(batch_size: int, world_size: int, rank: int) -> slice:
    """The rows of a global batch that one worker trains on.

    The batch is cut into ``world_size`` contiguous parts whose sizes differ by at most one
    (``numpy.array_split``); a part may be empty when the batch has fewer rows than workers.

    Args:
        batch_size: Rows in this global batch.
        world_size: Number of workers.
        rank: This worker's rank.

    Returns:
        The slice of the batch's rows for ``rank``.
    """
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Loss terms in a collated batch: label ids for a classifier, real target tokens for text-to-text."""
    return int((batch["labels"] != -100).sum())


def loss_weight(local_count: int, global_count: int, world_size: int) -> float:
    """Factor that turns a worker's mean loss into its share of the global-batch mean loss.

    DDP averages gradients over workers, i.e. divides their sum by ``world_size``. A worker whose
    slice holds ``local_count`` of the batch's ``global_count`` loss terms therefore scales its
    own mean loss by ``local_count * world_size / global_count``: the average of the scaled
    gradients is then exactly the gradient of the mean over the whole global batch, even when
    the slices are uneven (last batch) or hold different numbers of target tokens.

    Args:
        local_count: Loss terms in this worker's slice.
        global_count: Loss terms in the global batch.
        world_size: Number of workers.

    Returns:
        The weight (1.0 with one worker).
    """
    if global_count <= 0:
        return 0.0
    return local_count * world_size / global_count


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Torch seed (dropout) of one worker in one epoch.

    Seeding per epoch makes a job resumed at epoch ``e`` draw what an uninterrupted job draws.
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, as ``Student.fit`` builds it.

    Args:
        model: The (unwrapped) student model.
        lr: Learning rate.
        weight_decay: Decay of parameters with two or more dimensions.

    Returns:
        The optimiser.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def lr_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear decay to zero over ``total_steps`` (``schedule="linear"``) or a flat rate."""
    if schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def run_name_for(
    records: Sequence[dict], student: Student, settings: dict[str, Any], prefix: str = "train"
) -> str:
    """A Ray Train run name that identifies one training call by its content.

    A driver that restarts and repeats the same call (same start weights, records and settings)
    gets the same name, so Ray Train resumes its checkpoints; any other call gets a new name.

    Args:
        records: The training records, in order.
        student: The student before training.
        settings: Epochs, loss, seeds ….
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


def _nothing_to_train(records: Sequence[dict], epochs: int) -> bool:
    return len(records) == 0 or epochs <= 0


# ---- the per-worker loop -----------------------------------------------------------------------


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


def _maybe_fail(config: dict[str, Any], rank: int, epoch: int, step_in_epoch: int) -> None:
    # Test hook: fail once, mid-epoch, so a test can watch FailureConfig restart the job.
    marker = config.get("fail_once_marker")
    if not marker or rank != 0 or epoch != config.get("fail_at_epoch", 0) or step_in_epoch != 1:
        return
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once\n", encoding="utf-8")
        if config.get("fail_by_kill"):
            _wait_until_checkpoint_registered()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies, as on a lost node
        raise RuntimeError(f"injected training failure (marker {path})")


def _wait_until_checkpoint_registered(timeout_s: float = 120.0) -> None:
    """Test hook helper: wait until the controller has recorded this worker's latest checkpoint.

    A checkpoint counts once the controller polls the worker's report (every couple of seconds)
    and writes its snapshot; a worker killed before that loses the report, and the retry starts
    from the checkpoint before. The kill test waits so that it exercises the common case, a
    worker dying well after its last checkpoint.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    snapshot = Path(ray.train.get_context().get_storage().experiment_fs_path) / "checkpoint_manager_snapshot.json"
    name = Path(ckpt.path).name
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if snapshot.is_file() and name in snapshot.read_text(encoding="utf-8", errors="replace"):
            return
        time.sleep(0.2)


def _save_checkpoint(
    out: Path, student: Student, optimizer: Any, scheduler: Any, state: dict[str, Any]
) -> None:
    student.save(out / STUDENT_SUBDIR)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, out / OPTIM_FILE)
    (out / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def _all_reduce_mean(values: list[float], world_size: int) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
        tensor /= world_size
    return tensor.tolist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop of one worker (see the module docstring).

    Args:
        config: ``train_loop_config`` built by :func:`train_student_on_ray`.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    epochs, seed = int(config["epochs"]), int(config["seed"])
    loss_name, alpha, beta = config["loss"], float(config["alpha"]), float(config["beta"])
    loss_fn(loss_name)  # fail on a bad loss name before any work

    state: dict[str, Any] = {"epoch": 0, "loss": math.nan, "steps": 0}
    optim_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            student = _load_worker_student(config, ckpt, str(device))
            optim_state = torch.load(ckpt / OPTIM_FILE, map_location="cpu", weights_only=True)
    else:
        student = _load_worker_student(config, None, str(device))
    start_epoch = int(state["epoch"])
    resumed_from = start_epoch if checkpoint is not None else 0

    rows = _ordered_rows(ray.train.get_dataset_shard("train"))
    n, batch_size = len(rows), student.batch_size
    steps_per_epoch = math.ceil(n / batch_size)
    model = ray.train.torch.prepare_model(student.model)
    # DDP wraps the same parameter tensors, so the student's own module is trained in place.
    optimizer = adamw(student.model, student.lr, student.weight_decay)
    scheduler = lr_schedule(optimizer, student.schedule, max(1, epochs * steps_per_epoch))
    if optim_state is not None:
        optimizer.load_state_dict(optim_state["optimizer"])
        scheduler.load_state_dict(optim_state["scheduler"])
    params = [p for p in student.model.parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    for _ in range(start_epoch):
        rng.permutation(n)  # replay the orders of the epochs already done

    mlflow_run = config.get("mlflow")
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        order = rng.permutation(n)
        scaled_losses, lrs = [], []
        model.train()
        for i, begin in enumerate(range(0, n, batch_size)):
            _maybe_fail(config, rank, epoch, i)
            global_rows = [rows[j] for j in order[begin : begin + batch_size]]
            mine = global_rows[local_slice(len(global_rows), world, rank)]
            # A worker with an empty slice still joins DDP's gradient all-reduce, with weight 0.
            batch = student.collate(mine or global_rows[:1])
            weight = 1.0
            if world > 1:
                local = target_count(batch) if mine else 0
                weight = loss_weight(local, target_count(student.collate(global_rows)), world)
            value = student.batch_loss(model, batch, loss_name, alpha, beta) * weight
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            scaled_losses.append(float(value.detach()))
        model.eval()
        # The mean of the scaled losses over workers is the loss of each global batch.
        step_losses = _all_reduce_mean(scaled_losses, world)
        first_step = state["steps"]
        state = {
            "epoch": epoch + 1,
            "loss": float(np.mean(step_losses)) if step_losses else math.nan,
            "steps": first_step + len(step_losses),
            "resumed_from_epoch": resumed_from,
        }
        if rank == 0 and mlflow_run:
            _log_epoch(mlflow_run, first_step, step_losses, lrs, state)
        metrics = {**state, "workers": world}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save_checkpoint(Path(tmp), student, optimizer, scheduler, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics, checkpoint=None)


def _log_epoch(
    run: dict[str, str], first_step: int, losses: list[float], lrs: list[float], state: dict
) -> None:
    from gold_ray.tracking import log_metric_rows

    rows: list[tuple[int, dict[str, Any]]] = [
        (first_step + k, {"train.step_loss": loss, "train.lr": lr})
        for k, (loss, lr) in enumerate(zip(losses, lrs, strict=True))
    ]
    rows.append((state["epoch"], {"train.epoch_loss": state["loss"]}))
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
    epochs: int,
    loss: str,
    alpha: float,
    beta: float,
    out_dir: str,
    storage_path: str,
    name: str,
    mlflow_parent: dict | None = None,
    fail_once_marker: str | None = None,
    fail_at_epoch: int = 0,
    fail_by_kill: bool = False,
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
        epochs: Passes over ``records``.
        loss: ``ce`` or ``sce``.
        alpha: SCE weight of CE.
        beta: SCE weight of reverse CE.
        out_dir: Where the trained student is written (replaced if present).
        storage_path: Ray Train storage (checkpoints), a local folder or URI.
        name: Ray Train run name inside ``storage_path``.
        mlflow_parent: ``{"tracking_uri", "run_id"}``: log training into a nested child run.
        fail_once_marker: Tests only: rank 0 raises once in epoch ``fail_at_epoch`` unless this
            file exists (and creates it), to exercise the retry path.
        fail_at_epoch: Tests only; see ``fail_once_marker``.
        fail_by_kill: Tests only: the failing worker kills its own process (SIGKILL) instead
            of raising.

    Returns:
        ``{"loss": mean loss of the last epoch, "epochs", "steps", "seconds", "workers",
        "resumed_from_epoch"}``; loss NaN when there was nothing to train on.

    Raises:
        ray.train.TrainingFailedError: training failed more often than ``FailureConfig`` allows.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    res = cfg.resources
    if _nothing_to_train(records, epochs):
        task = load_task(task_name)
        source = (
            load_student(student_dir, task)
            if student_dir
            else build_student(task, cfg.student, model_path, seed=cfg.seed)
        )
        shutil.rmtree(out, ignore_errors=True)
        source.save(out)
        return {
            "loss": math.nan,
            "epochs": 0,
            "steps": 0,
            "seconds": time.perf_counter() - start,
            "workers": 0,
            "resumed_from_epoch": 0,
        }

    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    child_run = None
    if mlflow_parent:
        from gold_ray.tracking import start_child_run

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
        "epochs": epochs,
        "loss": loss,
        "alpha": alpha,
        "beta": beta,
        "mlflow": child_run,
        "fail_once_marker": fail_once_marker,
        "fail_at_epoch": fail_at_epoch,
        "fail_by_kill": fail_by_kill,
    }
    dataset = ray.data.from_items([{**rec, _INDEX: i} for i, rec in enumerate(records)])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.train_workers,
            use_gpu=res.train_use_gpu,
            resources_per_worker={"CPU": res.train_cpus_per_worker},
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
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint")
        with result.checkpoint.as_directory() as ckpt:
            ckpt = Path(ckpt)
            state = json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(ckpt / STUDENT_SUBDIR, out)
        status = "FINISHED"
    finally:
        if child_run is not None:
            from gold_ray.tracking import end_child_run

            end_child_run(child_run["tracking_uri"], child_run["run_id"], status)
    return {
        "loss": state["loss"],
        "epochs": state["epoch"],
        "steps": state["steps"],
        "seconds": time.perf_counter() - start,
        "workers": res.train_workers,
        "resumed_from_epoch": state.get("resumed_from_epoch", 0),
    }


def _storage_uri(storage_path: str) -> str:
    # Ray Train wants an absolute local path or a URI.
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


TrainHook = Callable[[Student, list[dict], int, str, float, float], dict[str, Any]]


def make_ray_train_fn(
    cfg: RunConfig,
    task_name: str,
    model_path: str,
    work_dir: str | Path,
    *,
    mlflow_parent: dict | Callable[[], dict | None] | None = None,
    keep_runs: bool = False,
) -> TrainHook:
    """The :class:`gold_ray.loop.Distiller` ``train`` hook, backed by Ray Train.

    The hook saves the given student to ``work_dir``, trains it with :func:`train_student_on_ray`
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
        ``train(student, records, epochs, loss, alpha, beta) -> metrics``.
    """
    work = Path(work_dir).resolve()

    def train(
        student: Student, records: list[dict], epochs: int, loss: str, alpha: float, beta: float
    ) -> dict:
        if _nothing_to_train(records, epochs):
            return {"loss": math.nan, "steps": 0, "seconds": 0.0, "epochs": 0, "workers": 0}
        settings = {
            "epochs": epochs,
            "loss": loss,
            "alpha": alpha,
            "beta": beta,
            "seed": cfg.seed,
            "workers": cfg.resources.train_workers,
        }
        name = run_name_for(records, student, settings)
        src, dst = work / "inputs" / name, work / "outputs" / name
        shutil.rmtree(src, ignore_errors=True)
        student.save(src)
        parent = mlflow_parent() if callable(mlflow_parent) else mlflow_parent
        metrics = train_student_on_ray(
            str(src),
            model_path,
            task_name,
            records,
            cfg=cfg,
            epochs=epochs,
            loss=loss,
            alpha=alpha,
            beta=beta,
            out_dir=str(dst),
            storage_path=str(work / "ray_train"),
            name=name,
            mlflow_parent=parent,
        )
        trained = load_student(dst, student.task, device="cpu")
        student.model.load_state_dict(trained.model.state_dict())
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
        if not keep_runs:
            shutil.rmtree(work / "ray_train" / name, ignore_errors=True)
        return metrics

    return train
