"""Tests of actors.training: Ray Train V2 student training, DDP equivalence, resume and retry.

The student is a tiny random BERT classifier with the real MiniLM vocabulary, dropout off so that
runs with different worker counts draw no different random numbers.
"""

from __future__ import annotations

import math

import psutil
import pytest
import torch

from actors.training import STATE_FILE, RayTrainStep, run_name_for, train_student_on_ray
from gold_ray.allocator import KEEP_FREED_MEMORY_ENV
from gold_ray.config import RunConfig
from gold_ray.devices import shared_threads
from gold_ray.run.tasks import load_task
from gold_ray.student.model import build_student, load_student
from gold_ray.student.training import Recipe
from tests.faults.hooks import plan_fault

SST2 = load_task("sst2")
EPOCHS = 2
RECIPE = Recipe(lr=1e-3, epochs=EPOCHS, max_epochs=EPOCHS)
"""Exactly what ``Student.fit(records, EPOCHS)`` does at the config's learning rate."""
GOOD = ["good", "great", "lovely", "fine", "superb"]
BAD = ["bad", "awful", "dull", "poor", "weak"]
TOPICS = ["plot", "acting", "music", "ending"]
# 40 records with batch size 8 and 37 kept: the last global batch has 5 rows, split 3/2 over two
# workers, so the uneven-slice weighting is exercised.
RECORDS = [
    {"text": f"the {t} was {w}", "label": "positive" if w in GOOD else "negative", "iteration": 0}
    for w in GOOD + BAD
    for t in TOPICS
][:37]


@pytest.fixture(scope="module")
def model_dir(tiny_student_no_dropout) -> str:
    return tiny_student_no_dropout


def _cfg(model_dir: str, workers: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "seed": 3,
            # float32: these tests compare weights across worker counts to 1e-5, finer than bfloat16 rounds.
            "student": {"model": model_dir, "batch_size": 8, "max_length": 16, "lr": 1e-3, "precision": "float32"},
            # A checkpoint every epoch, so that a failed worker resumes mid-run (the default writes
            # one per 30 s, none in these sub-second epochs).
            "resources": {"train_workers": workers, "train_cpus_per_worker": 0.5, "train_checkpoint_every_s": 0},
        }
    )


def _state(student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_run_name_depends_on_records_settings_and_weights(model_dir):
    student = build_student(SST2, _cfg(model_dir, 1).student, model_dir, seed=0)
    name = run_name_for(RECORDS, student, {"epochs": 1})
    assert name == run_name_for(RECORDS, student, {"epochs": 1})
    assert name != run_name_for(RECORDS[:-1], student, {"epochs": 1})
    assert name != run_name_for(RECORDS, student, {"epochs": 2})
    with torch.no_grad():
        next(student.model.parameters()).add_(1e-3)
    assert name != run_name_for(RECORDS, student, {"epochs": 1})


@pytest.fixture(scope="module")
def reference(ray_cluster, model_dir, tmp_path_factory):
    """One worker, through the loop hook, logging into MLflow: the run the others must match."""
    from gold_ray.reporting.tracking import MlflowTracker

    work = tmp_path_factory.mktemp("ref")
    cfg = _cfg(model_dir, 1).model_copy(
        update={
            "tracking": _cfg(model_dir, 1).tracking.model_copy(
                update={"tracking_uri": f"sqlite:///{work}/m.db"}
            )
        }
    )
    tracker = MlflowTracker(cfg, work)
    tracker.start("ref")
    student = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    before = _state(student)
    train = RayTrainStep(cfg, "sst2", model_dir, work / "scratch", mlflow_parent=tracker.parent_info)
    try:
        metrics = train(student, RECORDS, RECIPE)
    finally:
        train.close()
    return {
        "before": before,
        "after": _state(student),
        "metrics": metrics,
        "tracker": tracker,
        "work": work / "scratch",
    }


@pytest.mark.ray
@pytest.mark.slow
def test_one_worker_matches_in_process_fit_and_logs_to_mlflow(reference, model_dir):
    cfg = _cfg(model_dir, 1)
    local = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    fit = local.fit(RECORDS, EPOCHS, seed=cfg.seed)
    m = reference["metrics"]
    assert m["epochs"] == EPOCHS and m["workers"] == 1 and m["steps"] == fit["steps"] == 10
    # The worker trains on the node's cores, as the in-process loop does, not on the 0.5 CPU Ray books.
    assert m["threads"] == shared_threads(1)
    assert m["loss"] == pytest.approx(fit["loss"], abs=1e-5)
    assert _max_diff(reference["before"], reference["after"]) > 1e-3  # it trained
    assert _max_diff(reference["after"], _state(local)) < 1e-5
    # The weights travelled through the object store: no student and no progress file was left on disk
    # beside Ray Train's own checkpoint storage.
    assert sorted(p.name for p in reference["work"].iterdir()) == [RayTrainStep.RUN_NAME]

    tracker = reference["tracker"]
    children = tracker.client.search_runs(
        [tracker.client.get_run(tracker.run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{tracker.run_id}'",
    )
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    steps = tracker.client.get_metric_history(children[0].info.run_id, "train.step_loss")
    assert [s.step for s in steps] == list(range(1, 11))
    epoch_loss = tracker.client.get_metric_history(children[0].info.run_id, "train.epoch_loss")
    assert [e.step for e in epoch_loss] == [1, 2] and epoch_loss[-1].value == pytest.approx(m["loss"])


@pytest.mark.ray
@pytest.mark.slow
def test_two_ddp_workers_match_one_worker(reference, model_dir, tmp_path):
    cfg = _cfg(model_dir, 2)
    student = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    assert _max_diff(_state(student), reference["before"]) == 0.0
    train = RayTrainStep(cfg, "sst2", model_dir, tmp_path)
    try:
        metrics = train(student, RECORDS, RECIPE)
    finally:
        train.close()
    assert metrics["workers"] == 2 and metrics["steps"] == reference["metrics"]["steps"]
    assert metrics["threads"] == shared_threads(2)  # the node's cores shared by its two workers
    # Same global batches and gradients, summed in another order: equal up to float rounding.
    assert metrics["loss"] == pytest.approx(reference["metrics"]["loss"], abs=1e-5)
    assert _max_diff(_state(student), reference["after"]) < 1e-4


@pytest.mark.ray
@pytest.mark.slow
def test_a_kept_worker_group_serves_every_order_in_one_process(reference, model_dir, tmp_path):
    """Two trainings, one worker group: the second starts from the first's weights, sent through the
    object store, and ends where two in-process fits in a row end."""
    cfg = _cfg(model_dir, 1)
    student = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    train = RayTrainStep(cfg, "sst2", model_dir, tmp_path)
    try:
        first = train(student, RECORDS, RECIPE)
        assert _max_diff(_state(student), reference["after"]) < 1e-5
        second = train(student, RECORDS[5:25], Recipe(lr=1e-3, epochs=1, max_epochs=1))
        # The worker started with glibc told to keep freed memory (it trains in a thread of its own).
        env = psutil.Process(first["worker_pid"]).environ()
        assert {k: env.get(k) for k in KEEP_FREED_MEMORY_ENV} == KEEP_FREED_MEMORY_ENV
    finally:
        train.close()
    assert not train.workers.running
    assert second["worker_pid"] == first["worker_pid"]  # no new worker process for the second order
    assert second["steps"] == 3 and second["resumed_from_epoch"] == 0

    local = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    local.fit(RECORDS, EPOCHS, seed=cfg.seed)
    local.fit(RECORDS[5:25], 1, seed=cfg.seed)
    assert _max_diff(_state(student), _state(local)) < 1e-5


@pytest.mark.ray
@pytest.mark.slow
def test_failed_worker_is_retried_and_a_later_call_resumes_the_run(reference, model_dir, tmp_path):
    marker = tmp_path / "failed-once"
    common = {"cfg": _cfg(model_dir, 1), "recipe": RECIPE, "storage_path": str(tmp_path / "storage"), "name": "retry"}
    plan_fault("train.step", marker, rank=0, epoch=1, batch=1)
    metrics = train_student_on_ray(None, model_dir, "sst2", RECORDS, out_dir=str(tmp_path / "o1"), **common)
    assert marker.exists()  # the first attempt did fail, one step into epoch 2
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs"] == EPOCHS and metrics["steps"] == 10
    # Optimiser, schedule and batch order were restored: the same weights as an unbroken run.
    first = _state(load_student(tmp_path / "o1", SST2))
    assert _max_diff(first, reference["after"]) < 1e-5

    # A later call with the same storage and name (a restarted driver repeating the call) finds the
    # finished job and returns its result without training again.
    more = train_student_on_ray(None, model_dir, "sst2", RECORDS, out_dir=str(tmp_path / "o2"), **common)
    assert more["epochs"] == EPOCHS and more["steps"] == 10 and math.isfinite(more["loss"])
    assert _max_diff(first, _state(load_student(tmp_path / "o2", SST2))) == 0.0
    assert len(list((tmp_path / "storage" / "retry").rglob(STATE_FILE))) == 1  # num_to_keep=1


@pytest.mark.ray
@pytest.mark.slow
def test_a_group_that_fails_for_good_raises_and_the_next_training_starts_a_new_one(reference, model_dir, tmp_path):
    import ray.train

    # No restart: the first failure ends the training (each restart of a group costs seconds).
    cfg = _cfg(model_dir, 1)
    cfg.resources.train_max_failures = 0
    plan_fault("train.step", tmp_path / "failed-0", rank=0, epoch=0, batch=1)
    student = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    before = _state(student)
    train = RayTrainStep(cfg, "sst2", model_dir, tmp_path / "work")
    try:
        with pytest.raises(ray.train.TrainingFailedError):
            train(student, RECORDS, RECIPE)
        assert not train.workers.running
        assert _max_diff(before, _state(student)) == 0.0  # nothing half-trained came back
        metrics = train(student, RECORDS, RECIPE)
    finally:
        train.close()
    assert (tmp_path / "failed-0").exists()
    assert metrics["steps"] == 10 and metrics["resumed_from_epoch"] == 0
    assert _max_diff(_state(student), reference["after"]) < 1e-5


def test_nothing_to_train_copies_the_student_without_ray(model_dir, tmp_path):
    cfg = _cfg(model_dir, 2)
    student = build_student(SST2, cfg.student, model_dir, seed=cfg.seed)
    before = _state(student)
    train = RayTrainStep(cfg, "sst2", model_dir, tmp_path)
    assert math.isnan(train(student, [], RECIPE)["loss"])
    assert not train.workers.running  # no group was started for nothing
    assert _max_diff(before, _state(student)) == 0.0
    got = train_student_on_ray(
        None,
        model_dir,
        "sst2",
        RECORDS,
        cfg=cfg,
        recipe=Recipe(epochs=0),
        out_dir=str(tmp_path / "o"),
        storage_path=str(tmp_path / "s"),
        name="x",
    )
    assert got["steps"] == 0 and math.isnan(got["loss"])
    assert _max_diff(_state(load_student(tmp_path / "o", SST2)), before) == 0.0
