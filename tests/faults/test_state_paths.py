"""A state file that points outside its run directory is refused before anything is read or deleted.

Resume reads the committed state back; its part paths are read as data and its checkpoint path is
deleted once a newer checkpoint is committed. An edited or hostile ``state.json`` must therefore
not reach files outside the run.
"""

from __future__ import annotations

import json

import pytest

from gold_ray.run import store
from gold_ray.run.loop import Distiller
from tests.faults.faultkit import SometimesGarbageEngine, run_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_student, eval_file):
    run = tmp_path_factory.mktemp("state-paths") / "run"
    Distiller(run_config(run, tiny_student, eval_file), engine=SometimesGarbageEngine()).run()
    return run


def _tampered_copy(tmp_path, finished_run, **changes):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = json.loads((run / store.STATE_FILE).read_text())
    state.update({"finished": False, "iteration": 0, "stage": "generate", **changes})
    (run / store.STATE_FILE).write_text(json.dumps(state))
    return run


@pytest.mark.parametrize("field", ["checkpoint", "parts"])
def test_a_state_path_outside_the_run_is_refused_and_nothing_outside_is_touched(
        tmp_path, finished_run, tiny_student, eval_file, field):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not gold-ray's")
    value = "../victim" if field == "checkpoint" else ["data/train-it000.parquet", "../victim/keep.txt"]
    run = _tampered_copy(tmp_path, finished_run, **{field: value})
    with pytest.raises(store.StateFileError, match=r"outside the run directory") as err:
        Distiller(run_config(run, tiny_student, eval_file), engine=SometimesGarbageEngine(), resume=True)
    assert str(run / store.STATE_FILE) in str(err.value)
    assert (victim / "keep.txt").read_text() == "not gold-ray's"


def test_an_absolute_state_path_is_refused(tmp_path):
    with pytest.raises(store.StateFileError, match="checkpoint"):
        store.path_inside(tmp_path, str(tmp_path / "checkpoints"), "checkpoint")
    assert store.path_inside(tmp_path, "checkpoints/it000", "checkpoint") == tmp_path / "checkpoints/it000"


def test_a_state_file_that_is_not_json_names_the_file(tmp_path):
    (tmp_path / store.STATE_FILE).write_text("{not json")
    with pytest.raises(store.StateFileError, match=store.STATE_FILE):
        store.load_state(tmp_path)


@pytest.mark.parametrize(("changes", "field"), [
    ({"stage": "polish"}, "stage"),
    ({"iteration": "one"}, "iteration"),
    ({"iteration": True}, "iteration"),
    ({"feedback": None}, "feedback"),
    ({"pending_probes": [1]}, "pending_probes"),
])
def test_a_state_field_of_the_wrong_kind_is_refused_naming_it(tmp_path, finished_run, tiny_student, eval_file,
                                                             changes, field):
    run = _tampered_copy(tmp_path, finished_run, **changes)
    with pytest.raises(store.StateFileError, match=rf"state.json: {field} must be"):
        Distiller(run_config(run, tiny_student, eval_file), engine=SometimesGarbageEngine(), resume=True)
