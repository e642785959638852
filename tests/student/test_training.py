"""Tests of gold_ray.student.training: the one training loop, its recipes and the synthetic split."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gold_ray.config import StudentConfig
from gold_ray.run.tasks import load_task
from gold_ray.student.model import build_student
from gold_ray.student.training import (
    MIN_VAL_RECORDS,
    Recipe,
    choose_recipe,
    final_recipes,
    fit,
    in_loop_recipe,
    learning_check,
    local_slice,
    loss_weight,
    synthetic_split,
)

SST2 = load_task("sst2")
GOOD = ["good", "great", "lovely", "fine", "superb", "nice"]
BAD = ["bad", "awful", "dull", "poor", "weak", "bland"]
TOPICS = ["plot", "acting", "music", "ending", "cast", "script"]
RECORDS = [
    {"id": f"r{i}", "text": f"the {t} was {w}", "label": "positive" if w in GOOD else "negative"}
    for i, (w, t) in enumerate((w, t) for w in GOOD + BAD for t in TOPICS)
]


@pytest.fixture(scope="module")
def model_dir(tiny_student_no_dropout) -> str:
    """Dropout off: a fit resumed from an epoch must end on the weights of an unbroken one."""
    return tiny_student_no_dropout


def _student(model_dir: str, lr: float = 1e-3):
    return build_student(SST2, StudentConfig(model=model_dir, batch_size=8, max_length=16, lr=lr), model_dir, seed=0)


def _weights(student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in student.model.state_dict().items()}


def test_local_slice_covers_the_batch_once():
    for size in range(0, 12):
        for world in (1, 2, 3):
            rows = [i for r in range(world) for i in range(size)[local_slice(size, world, r)]]
            assert rows == list(range(size))
    assert local_slice(5, 2, 0) == slice(0, 3) and local_slice(5, 2, 1) == slice(3, 5)


def test_loss_weight_makes_the_ddp_average_the_global_mean():
    m0, m1 = 0.9, 0.4
    avg = (m0 * loss_weight(3, 5, 2) + m1 * loss_weight(2, 5, 2)) / 2
    assert avg == pytest.approx((3 * m0 + 2 * m1) / 5)
    assert loss_weight(4, 4, 1) == 1.0 and loss_weight(0, 0, 2) == 0.0


def test_the_step_floor_raises_epochs_up_to_the_cap():
    recipe = Recipe(epochs=1, min_steps=60, max_epochs=20)
    assert recipe.planned_epochs(51, 32) == 20  # 2 steps an epoch: the cap binds
    assert recipe.planned_epochs(320, 32) == 6  # 10 steps an epoch: 60 steps
    assert recipe.planned_epochs(3200, 32) == 1  # the floor is already met
    assert Recipe(epochs=3, max_epochs=3).planned_epochs(10, 32) == 3
    assert Recipe(epochs=0).planned_epochs(10, 32) == 0


def test_the_synthetic_split_is_stable_as_data_grows_and_needs_enough_records():
    records = [{"id": f"it000-train-{i:05d}"} for i in range(400)]
    train, val = synthetic_split(records, 0.1, seed=0)
    assert 20 <= len(val) <= 60 and len(train) + len(val) == 400
    more_train, more_val = synthetic_split(records + [{"id": f"it001-train-{i:05d}"} for i in range(400)], 0.1, 0)
    assert {r["id"] for r in val} <= {r["id"] for r in more_val}
    assert not {r["id"] for r in val} & {r["id"] for r in more_train}
    assert synthetic_split(records[:50], 0.1, 0) == (records[:50], [])  # under MIN_VAL_RECORDS held out
    assert synthetic_split(records, 0.1, seed=1)[1] != val


def test_records_without_ids_are_split_by_their_content():
    records = [{"text": f"review {i}", "label": "positive"} for i in range(400)]
    train, val = synthetic_split(records, 0.1, seed=0)
    assert 20 <= len(val) <= 60 and len(train) + len(val) == 400
    assert synthetic_split(list(reversed(records)), 0.1, seed=0)[1] == list(reversed(val))


def test_a_fresh_students_split_the_hashes_leave_short_is_topped_up_when_there_are_records_enough():
    # Seeds whose hashes hold out fewer than MIN_VAL_RECORDS of 200 records at a share of 0.1
    # (about one in six): for a fresh student the next hashes up are held out too.
    from gold_ray.student.training import share_point

    records = [{"id": f"it000-train-{i:05d}"} for i in range(200)]
    short = [s for s in range(40) if sum(share_point(r["id"], s) < 0.1 for r in records) < MIN_VAL_RECORDS]
    assert short, "no seed in 0..39 leaves the split short"
    for seed in short:
        assert synthetic_split(records, 0.1, seed) == (records, [])  # a continued student: dropped
        hashed = {r["id"] for r in records if share_point(r["id"], seed) < 0.1}
        train, val = synthetic_split(records, 0.1, seed, top_up=True)
        assert len(val) == MIN_VAL_RECORDS and len(train) == 200 - MIN_VAL_RECORDS
        assert hashed < {r["id"] for r in val}
        lowest_left = min(share_point(r["id"], seed) for r in train)
        assert all(share_point(r["id"], seed) < lowest_left for r in val)
    # Too few records for MIN_VAL_RECORDS at this share: nothing held out, as before.
    assert synthetic_split(records[:150], 0.1, short[0], top_up=True) == (records[:150], [])


def test_a_continued_student_never_validates_on_a_record_it_trained_on():
    # The data grows by 50 records an iteration: the first splits are too small to use, and a
    # student that goes on training keeps their records out of training all the same, so the
    # split it validates on later holds none of what it trained on.
    trained: set[str] = set()
    records: list[dict] = []
    used = 0
    for it in range(8):
        records += [{"id": f"it{it:03d}-train-{i:05d}"} for i in range(50)]
        train, val = synthetic_split(records, 0.1, seed=3, top_up=(it == 0), keep_out=True)
        assert not trained & {r["id"] for r in val}
        assert len(train) + len(val) <= len(records) and train
        trained |= {r["id"] for r in train}
        used += bool(val)
    assert used >= 4  # the split is in use once there are enough records
    # Without keep_out (a fresh student each time) a short split trains on everything.
    assert synthetic_split(records[:50], 0.1, seed=3) == (records[:50], [])
    assert len(synthetic_split(records[:50], 0.1, seed=3, keep_out=True)[0]) < 50
    # A handful of records that all hash out still leave something to train on.
    few = [{"id": f"r{i}"} for i in range(3)]
    assert synthetic_split(few, 0.99, seed=0, keep_out=True) == (few, [])


def test_pinned_epochs_give_exactly_those_epochs_and_the_default_fits_with_a_floor():
    pinned = in_loop_recipe(StudentConfig(epochs_per_iteration=2))
    assert (pinned.epochs, pinned.max_epochs, pinned.min_steps, pinned.patience) == (2, 2, 0, 0)
    default = in_loop_recipe(StudentConfig())
    assert default.min_steps > 0 and default.patience > 0 and default.loss == "ce"


def test_final_candidates_are_bounded_and_the_strategys_own_loss_comes_first():
    cfg = StudentConfig()
    both = final_recipes(cfg, ("sce", 0.1, 1.0), selectable=True)
    assert [r.loss for r in both] == ["sce", "ce"] and both[0].alpha == 0.1
    # The final training keeps its last epoch; an iteration's keeps its best.
    assert not any(r.keep_best or r.patience for r in both) and in_loop_recipe(cfg).keep_best
    assert [r.loss for r in final_recipes(cfg, ("sce", 0.1, 1.0), selectable=False)] == ["sce"]
    # `own`: the strategy's loss alone, even with a split to choose on.
    assert [r.loss for r in final_recipes(StudentConfig(final_loss="own"), ("sce", 0.1, 1.0), selectable=True)] == ["sce"]
    pinned = StudentConfig(final_loss="ce", final_epochs=3, final_lrs=[1e-4, 3e-4])
    recipes = final_recipes(pinned, ("ce", 1.0, 1.0), selectable=True)
    assert [(r.loss, r.lr, r.epochs, r.max_epochs) for r in recipes] == [("ce", 1e-4, 3, 3), ("ce", 3e-4, 3, 3)]
    assert not any(r.keep_best for r in recipes)  # pinned epochs end on the last one too


def test_choose_recipe_keeps_the_strategys_own_loss_within_the_splits_noise():
    sce, ce = Recipe(loss="sce", alpha=0.1), Recipe(loss="ce")
    assert choose_recipe([(sce, {"val_accuracy": 0.80}), (ce, {"val_accuracy": 0.82})], own_loss="sce", n_val=100) == 0
    assert choose_recipe([(sce, {"val_accuracy": 0.70}), (ce, {"val_accuracy": 0.82})], own_loss="sce", n_val=100) == 1
    assert choose_recipe([(sce, {"val_accuracy": 0.9})], own_loss="sce", n_val=100) == 0


def test_choose_recipe_passes_over_a_trial_still_at_chance():
    # Measured on the demo: SCE's best epoch was 20 of 22 right by luck at a loss of 0.686 (ln 2 = 0.693).
    sce, ce = Recipe(loss="sce", alpha=0.1), Recipe(loss="ce")
    lucky = {"val_accuracy": 0.91, "val_loss": 0.686}
    fitted = {"val_accuracy": 0.77, "val_loss": 0.49}
    assert choose_recipe([(sce, lucky), (ce, fitted)], own_loss="sce", n_val=22, n_classes=2) == 1
    both_at_chance = {"val_accuracy": 0.6, "val_loss": 0.69}
    assert choose_recipe([(sce, lucky), (ce, both_at_chance)], own_loss="sce", n_val=22, n_classes=2) == 0


def test_learning_check_flags_a_student_near_chance():
    val = [{"label": "positive"}] * 12 + [{"label": "negative"}] * 8
    near = learning_check(SST2, {"steps": 10, "loss": 0.69, "recipe": "ce-lr0.0001", "val_loss": 0.69,
                                 "val_accuracy": 0.6}, val)
    assert near["near_chance"] and "near chance" in near["warning"]
    assert near["chance_loss"] == pytest.approx(math.log(2), abs=1e-4) and near["val_majority"] == 0.6
    learned = learning_check(SST2, {"steps": 10, "loss": 0.1, "recipe": "ce-lr0.0001", "val_loss": 0.2,
                                    "val_accuracy": 0.95}, val)
    assert not learned["near_chance"] and "warning" not in learned
    # A student that fits noisy labels confidently: its validation loss is above ln 2, yet it
    # fits its data and beats the majority share; it is not near chance.
    confident = learning_check(SST2, {"steps": 10, "loss": 0.01, "recipe": "ce-lr0.0001", "val_loss": 0.84,
                                      "val_accuracy": 0.75}, val)
    assert not confident["near_chance"]
    # An SCE fit has no CE training loss: its validation accuracy decides.
    sce_at_chance = learning_check(SST2, {"steps": 10, "loss": 4.6, "recipe": "sce-a0.1-b1-lr0.0001",
                                          "val_loss": 0.69, "val_accuracy": 0.6}, val)
    assert sce_at_chance["near_chance"] and "validation accuracy" in sce_at_chance["warning"]


def test_fit_with_a_split_stops_on_a_plateau_and_keeps_the_best_epoch(model_dir):
    # The validation labels are the training labels flipped: the better the student fits its
    # training data, the worse it does there, so validation peaks early and training must stop.
    flip = {"positive": "negative", "negative": "positive"}
    train = RECORDS[::2]
    val = [{**r, "label": flip[r["label"]]} for r in RECORDS[1::2]]
    assert len(val) >= MIN_VAL_RECORDS
    student = _student(model_dir, lr=3e-3)
    per_epoch = math.ceil(len(train) / student.batch_size)
    floor = 6 * per_epoch  # six epochs before any stop, whatever the split says
    result = fit(student, train, Recipe(lr=3e-3, epochs=1, min_steps=floor, max_epochs=40, patience=2), seed=0,
                 val_records=val)
    curve = result["curve"]
    assert result["stopped_early"] and result["epochs"] < 40 and len(curve) == result["epochs"]
    assert result["steps"] >= floor  # the step floor comes before early stopping
    # Two epochs without a better score, once past the floor, then stop.
    assert result["epochs"] == max(result["best_epoch"] + 2, 6)
    assert curve[-1]["loss"] < curve[0]["loss"]  # it did train
    # The returned weights are the best epoch's: evaluating them again gives its numbers.
    from gold_ray.student.training import validation_metrics

    assert validation_metrics(student, val)["val_accuracy"] == pytest.approx(result["val_accuracy"])


def test_fit_keeping_the_last_epoch_measures_the_split_but_runs_every_planned_epoch(model_dir):
    # The same flipped split as above: a best-epoch fit would stop early and go back; this one may not.
    flip = {"positive": "negative", "negative": "positive"}
    train = RECORDS[::2]
    val = [{**r, "label": flip[r["label"]]} for r in RECORDS[1::2]]
    student = _student(model_dir, lr=3e-3)
    result = fit(student, train, Recipe(lr=3e-3, epochs=6, max_epochs=6, keep_best=False), seed=0, val_records=val)
    curve = result["curve"]
    assert result["epochs"] == len(curve) == 6 and not result["stopped_early"]
    assert all("val_loss" in point for point in curve) and result["best_epoch"] == 6
    from gold_ray.student.training import validation_metrics

    assert validation_metrics(student, val)["val_accuracy"] == pytest.approx(curve[-1]["val_accuracy"])
    assert result["val_accuracy"] == curve[-1]["val_accuracy"]


def test_fit_resumed_from_an_epoch_trains_what_an_unbroken_call_trains(model_dir):
    recipe = Recipe(lr=1e-3, epochs=3, max_epochs=3)
    unbroken = _student(model_dir)
    fit(unbroken, RECORDS, recipe, seed=4)

    broken = _student(model_dir)
    saved = {}

    def on_epoch(state, optimizer, scheduler, best):
        if state.epoch == 1:
            # Deep copies: a checkpoint is written to disk at once, while the live tensors keep training.
            saved.update(copy.deepcopy({"state": state.to_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "best": best}),
                         weights=_weights(broken))

    fit(broken, RECORDS, Recipe(lr=1e-3, epochs=3, max_epochs=3), seed=4, on_epoch=on_epoch)
    resumed = _student(model_dir)
    resumed.model.load_state_dict(saved.pop("weights"))
    result = fit(resumed, RECORDS, recipe, seed=4, resume=saved)
    assert result["epochs"] == 3
    diff = max(float((a - b).abs().max()) for a, b in zip(_weights(resumed).values(), _weights(unbroken).values(),
                                                          strict=True))
    assert diff < 1e-5
